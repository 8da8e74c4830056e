"""The loop's ports written once, over a transport: :class:`InferenceAdapter` and
:class:`ToolsAdapter` build each request (services/orchestrator/downstream.py), hand it to a
subclass's call of that service method, and read the reply. The gRPC clients
(services/orchestrator/clients.py) call over a channel, the in-process adapter
(services/orchestrator/inprocess.py) calls the services' cores.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from agentmesh.inference.v1 import inference_pb2
from agentmesh.tools.v1 import tools_pb2

from services.orchestrator.downstream import (
    answer_item,
    call_tools_request,
    call_tools_result,
    count_tokens_request,
    execute_tools_request,
    generate_request,
    generate_result,
    stream_request,
    token_count,
    tool_outcomes,
    tools_listed,
)
from services.orchestrator.loop.types import (
    CallToolsResult,
    ComposeDelta,
    ComposeDone,
    Decoding,
    GenerateResult,
    LaneRequest,
    Message,
    Principal,
    TokenCount,
    ToolCallsChosen,
    ToolDef,
    ToolInvocation,
    ToolOutcome,
)
from shared.principal_wire import PRINCIPAL_HEADER

Metadata = tuple[tuple[str, str], ...]


class InferenceAdapter:
    """InferencePort over a transport: each port method builds its request, hands it to the
    subclass's call of that service method (``timeout_s``: the call's whole budget, full-lane
    retries included; the service's errors as the loop's) and reads the reply."""

    async def _generate(
        self, request: inference_pb2.GenerateRequest, timeout_s: float
    ) -> inference_pb2.GenerateResponse:
        raise NotImplementedError

    async def _call_tools(
        self, request: inference_pb2.CallToolsRequest, timeout_s: float
    ) -> inference_pb2.CallToolsResponse:
        raise NotImplementedError

    def _stream_generate(
        self, request: inference_pb2.StreamGenerateRequest, timeout_s: float
    ) -> AsyncGenerator[inference_pb2.StreamGenerateResponse, None]:
        """The replies (a refusal before the first one retried like a unary call); closing
        the generator early aborts the engine request."""
        raise NotImplementedError

    async def _count_tokens(
        self, request: inference_pb2.CountTokensRequest, timeout_s: float
    ) -> inference_pb2.CountTokensResponse:
        raise NotImplementedError

    async def plan(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        json_schema: str,
        max_tokens: int,
        timeout_s: float,
    ) -> GenerateResult:
        request = generate_request(
            messages, tools, lane, json_schema=json_schema, max_tokens=max_tokens
        )
        return generate_result(await self._generate(request, timeout_s))

    async def emit_tool_calls(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        names: Sequence[str],
        lane: LaneRequest,
        *,
        parallel: bool,
        decoding: Decoding,
        max_tokens: int | None,
        timeout_s: float,
    ) -> CallToolsResult:
        request = call_tools_request(
            messages,
            tools,
            names,
            lane,
            parallel=parallel,
            decoding=decoding,
            max_tokens=max_tokens,
        )
        return call_tools_result(await self._call_tools(request, timeout_s))

    async def answer(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        tool_choice: str,
        max_calls: int,
        max_tokens: int,
        timeout_s: float,
    ) -> AsyncGenerator[ComposeDelta | ToolCallsChosen | ComposeDone, None]:
        request = stream_request(
            messages,
            tools,
            lane,
            tool_choice=tool_choice,
            max_calls=max_calls,
            max_tokens=max_tokens,
        )
        async with aclosing(self._stream_generate(request, timeout_s)) as replies:
            async for reply in replies:
                item = answer_item(reply)
                if item is not None:
                    yield item

    async def count_tokens(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        texts: Sequence[str] = (),
        truncate_to: int = 0,
        timeout_s: float,
    ) -> TokenCount:
        request = count_tokens_request(messages, tools, lane, texts=texts, truncate_to=truncate_to)
        return token_count(await self._count_tokens(request, timeout_s))


class ToolsAdapter:
    """ToolsPort over a transport, as :class:`InferenceAdapter`; the principal travels as the
    ``agentmesh-principal`` metadata ExecuteTools reads."""

    async def _list_tools(self, timeout_s: float) -> tools_pb2.ListToolsResponse:
        raise NotImplementedError

    async def _execute_tools(
        self, request: tools_pb2.ExecuteToolsRequest, metadata: Metadata, timeout_s: float
    ) -> tools_pb2.ExecuteToolsResponse:
        raise NotImplementedError

    async def list_tools(self, *, timeout_s: float) -> list[ToolDef]:
        return tools_listed(await self._list_tools(timeout_s))

    async def execute(
        self,
        invocations: Sequence[ToolInvocation],
        *,
        principal: Principal,
        timeout_s: float,
    ) -> list[ToolOutcome]:
        request = execute_tools_request(invocations)
        metadata = ((PRINCIPAL_HEADER, principal.header()),)
        return tool_outcomes(await self._execute_tools(request, metadata, timeout_s))
