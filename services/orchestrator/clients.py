"""gRPC adapters implementing the loop's ports over the inference and tools services.

Each call gets the loop's ``timeout_s`` as its gRPC deadline. If the awaiting task is
cancelled (client disconnect), the call is cancelled too, so the inference service aborts the
engine request and the tools service cancels pending tool calls. Requests are built and
replies read by services/orchestrator/downstream.py, which the in-process adapter
(services/orchestrator/inprocess.py) shares.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.orchestrator.downstream import (
    INFERENCE_SERVICE,
    TOOLS_SERVICE,
    answer_item,
    call_tools_request,
    call_tools_result,
    capacity_delay,
    count_tokens_request,
    execute_tools_request,
    generate_request,
    generate_result,
    retry_capacity,
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
from shared.deadlines import Deadline
from shared.errors import (
    AgentmeshError,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from shared.principal_wire import PRINCIPAL_HEADER

# Side-effect free, so safe to retry on UNAVAILABLE. ExecuteTools too: every write in it
# carries an idempotency key, so a retried batch never moves money twice.
INFERENCE_RETRY_METHODS: list[tuple[str, str | None]] = [
    (INFERENCE_SERVICE, "Generate"),
    (INFERENCE_SERVICE, "CallTools"),
    (INFERENCE_SERVICE, "ListLanes"),
    (INFERENCE_SERVICE, "CountTokens"),
]
TOOLS_RETRY_METHODS: list[tuple[str, str | None]] = [
    (TOOLS_SERVICE, "ListTools"),
    (TOOLS_SERVICE, "ExecuteTools"),
]

__all__ = [
    "INFERENCE_RETRY_METHODS",
    "INFERENCE_SERVICE",
    "PRINCIPAL_HEADER",
    "TOOLS_RETRY_METHODS",
    "TOOLS_SERVICE",
    "GrpcInference",
    "GrpcTools",
    "domain_error",
    "retry_after",
]


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay a RESOURCE_EXHAUSTED status carries (None: no hint)."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            seconds: float = info.retry_delay.ToNanoseconds() / 1e9
            return max(0.0, seconds)
    return None


def _hint(error: Exception) -> float | None:
    return retry_after(error) if isinstance(error, grpc.aio.AioRpcError) else None


def domain_error(error: grpc.aio.AioRpcError, what: str) -> AgentmeshError:
    """A downstream status as our own error (the downstream's text stays out, except the
    field-level messages our own services write for bad arguments)."""
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what} did not answer in time")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint = retry_after(error)
        return ResourceExhausted(
            f"{what} is at capacity", retry_after_s=1.0 if hint is None else hint
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(what, error.details() or "rejected the request")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: not found")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(f"{what}: failed precondition")
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(f"{what} was cancelled")
    return Unavailable(f"{what} is unavailable")


async def _unary(start: Callable[[float], Any], timeout_s: float, what: str) -> Any:
    """Runs a unary call, ``start(timeout)`` per attempt, retrying a full lane on its hint.

    Cancelling the awaiting task cancels the RPC in flight.
    """

    async def attempt(timeout: float) -> Any:
        call = start(timeout)
        try:
            return await call
        except asyncio.CancelledError:
            call.cancel()
            raise

    try:
        return await retry_capacity(attempt, timeout_s, _hint)
    except grpc.aio.AioRpcError as error:
        raise domain_error(error, what) from None


async def _chain(first: Any, call: Any) -> AsyncIterator[Any]:
    """The stream's first message (already read; EOF for an empty stream) and the rest."""
    message = first
    while message is not grpc.aio.EOF:
        yield message
        message = await call.read()


# ---------------------------------------------------------------------- ports


class GrpcInference:
    """InferencePort over InferenceService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)

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
        response: inference_pb2.GenerateResponse = await _unary(
            lambda t: self._stub.Generate(request, timeout=t), timeout_s, "the inference service"
        )
        return generate_result(response)

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
        response: inference_pb2.CallToolsResponse = await _unary(
            lambda t: self._stub.CallTools(request, timeout=t), timeout_s, "the inference service"
        )
        return call_tools_result(response)

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
        deadline = Deadline.after(timeout_s)
        attempt = 1
        call = self._stub.StreamGenerate(request, timeout=timeout_s)
        try:
            while True:
                try:
                    first = await call.read()
                    break
                except grpc.aio.AioRpcError as error:
                    # Refused before the first token (the engine's budget is full): like the
                    # unary calls, wait the hint and retry while the deadline has room.
                    delay = capacity_delay(retry_after(error), attempt, deadline)
                    if delay is None:
                        raise
                    attempt += 1
                    await asyncio.sleep(delay)
                    call = self._stub.StreamGenerate(
                        request, timeout=max(deadline.time_remaining(), 0.001)
                    )
            async for response in _chain(first, call):
                item = answer_item(response)
                if item is not None:
                    yield item
        except grpc.aio.AioRpcError as error:
            raise domain_error(error, "the inference service") from None
        finally:
            # A no-op once the stream ended; aborts the engine request otherwise.
            call.cancel()

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
        response: inference_pb2.CountTokensResponse = await _unary(
            lambda t: self._stub.CountTokens(request, timeout=t),
            timeout_s,
            "the inference service",
        )
        return token_count(response)


class GrpcTools:
    """ToolsPort over ToolService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tools_pb2_grpc.ToolServiceStub(channel)

    async def list_tools(self, *, timeout_s: float) -> list[ToolDef]:
        response: tools_pb2.ListToolsResponse = await _unary(
            lambda t: self._stub.ListTools(tools_pb2.ListToolsRequest(), timeout=t),
            timeout_s,
            "the tool service",
        )
        return tools_listed(response)

    async def execute(
        self,
        invocations: Sequence[ToolInvocation],
        *,
        principal: Principal,
        timeout_s: float,
    ) -> list[ToolOutcome]:
        request = execute_tools_request(invocations)
        response: tools_pb2.ExecuteToolsResponse = await _unary(
            lambda t: self._stub.ExecuteTools(
                request, timeout=t, metadata=((PRINCIPAL_HEADER, principal.header()),)
            ),
            timeout_s,
            "the tool service",
        )
        return tool_outcomes(response)
