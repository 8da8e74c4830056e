"""The whole agent in one process: the loop's ports over the inference and tools services'
own cores, called directly (no channel, no RPC, no bytes on a wire).

- :class:`LocalInference` (InferencePort) calls :class:`InferenceCore` with the request
  messages the gRPC adapter would send (built by services/orchestrator/downstream.py, which
  also reads the replies), after the same request checks the inference server's guard runs.
- :class:`LocalTools` (ToolsPort) calls :meth:`ToolsService.execute_tools`, the principal
  parsed from its ``agentmesh-principal`` value exactly as ExecuteTools parses the RPC's
  metadata: the executor binds principal-bound arguments the same way in both.
- Both retry a full lane on its hint as the gRPC adapters do, turn a call past its
  ``timeout_s`` into DEADLINE_EXCEEDED and anything unexpected into UNAVAILABLE, and pass
  the services' own domain errors on.
- :class:`InProcessBackends` builds, starts and closes both services from their settings;
  ``OrchestratorService(settings, backends=...)`` serves AgentService over them, or a library
  takes ``backends.inference`` / ``backends.tools`` for its own TurnRunner.

``python -m services.orchestrator.inprocess``: that one process on the orchestrator's port,
configured like the three services (the inference, tools and orchestrator sections of
``AGENTMESH_CONFIG``; ``AGENTMESH_<SERVICE>_*`` environment variables).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from agentmesh.inference.v1 import inference_pb2
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from services.inference.config import InferenceSettings
from services.inference.core import InferenceCore
from services.inference.service import InferenceService
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
    method,
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
from services.tools.config import ToolsSettings
from services.tools.principal import Principal as ToolsPrincipal
from services.tools.service import ToolsService
from shared.deadlines import Deadline
from shared.errors import AgentmeshError, DeadlineExceeded, ResourceExhausted, Unavailable
from shared.guard import RequestChecks
from shared.health import HealthReporter
from shared.principal_wire import PRINCIPAL_HEADER

T = TypeVar("T")

log = logging.getLogger("agentmesh.orchestrator")

INFERENCE = "the inference service"
TOOLS = "the tool service"


def _hint(error: Exception) -> float | None:
    return error.retry_after_s if isinstance(error, ResourceExhausted) else None


def _unexpected(error: Exception, what: str) -> Unavailable:
    """What the gRPC path turns an unexpected server error into (INTERNAL -> UNAVAILABLE)."""
    log.error("%s failed unexpectedly", what, exc_info=error)
    return Unavailable(f"{what} is unavailable")


async def _call(run: Callable[[float], Awaitable[T]], timeout_s: float, what: str) -> T:
    """``run(seconds left)`` bounded by them, a full lane retried on its hint."""

    async def attempt(timeout: float) -> T:
        try:
            async with asyncio.timeout(timeout):
                return await run(timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"{what} did not answer in time") from None

    try:
        return await retry_capacity(attempt, timeout_s, _hint)
    except AgentmeshError:
        raise
    except Exception as error:
        raise _unexpected(error, what) from error


class _Checked:
    """The per-method request checks the service's server guard runs before its handler."""

    def __init__(self, service: str, checks: RequestChecks | None) -> None:
        self._service_name = service
        self._checks = checks or {}

    def check(self, name: str, request: Any) -> None:
        check = self._checks.get(method(self._service_name, name))
        if check is not None:
            check(request)


class LocalInference(_Checked):
    """InferencePort over the inference service's core, in this process."""

    def __init__(self, core: InferenceCore, checks: RequestChecks | None = None) -> None:
        super().__init__(INFERENCE_SERVICE, checks)
        self._core = core

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
        self.check("Generate", request)
        response = await _call(lambda _: self._core.generate(request), timeout_s, INFERENCE)
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
        self.check("CallTools", request)
        response = await _call(lambda _: self._core.call_tools(request), timeout_s, INFERENCE)
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
        self.check("StreamGenerate", request)
        deadline = Deadline.after(timeout_s)
        attempt = 1
        while True:
            stream = self._core.stream_generate(request)
            try:
                reply = await _next(stream, deadline)
                break
            except ResourceExhausted as error:
                # Refused before the first token (the engine's budget is full): wait the
                # hint and retry while the deadline has room, as the gRPC adapter does.
                await stream.aclose()
                delay = capacity_delay(error.retry_after_s, attempt, deadline)
                if delay is None:
                    raise
                attempt += 1
                await asyncio.sleep(delay)
            except BaseException:
                await stream.aclose()
                raise
        try:
            while reply is not None:
                item = answer_item(reply)
                if item is not None:
                    yield item
                reply = await _next(stream, deadline)
        finally:
            # A no-op once the stream ended; aborts the engine request otherwise.
            await stream.aclose()

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
        self.check("CountTokens", request)
        response = await _call(lambda _: self._core.count_tokens(request), timeout_s, INFERENCE)
        return token_count(response)


async def _next(
    stream: AsyncGenerator[inference_pb2.StreamGenerateResponse, None], deadline: Deadline
) -> inference_pb2.StreamGenerateResponse | None:
    """The stream's next reply (None at its end), within the call's deadline."""
    try:
        async with asyncio.timeout(max(0.0, deadline.time_remaining())):
            return await anext(stream)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise DeadlineExceeded(f"{INFERENCE} did not answer in time") from None
    except AgentmeshError:
        raise
    except Exception as error:
        raise _unexpected(error, INFERENCE) from error


class LocalTools(_Checked):
    """ToolsPort over the tool service, in this process."""

    def __init__(self, service: ToolsService, checks: RequestChecks | None = None) -> None:
        super().__init__(TOOLS_SERVICE, checks)
        self._service = service

    async def list_tools(self, *, timeout_s: float) -> list[ToolDef]:
        return tools_listed(self._service.list_tools())

    async def execute(
        self,
        invocations: Sequence[ToolInvocation],
        *,
        principal: Principal,
        timeout_s: float,
    ) -> list[ToolOutcome]:
        request = execute_tools_request(invocations)
        self.check("ExecuteTools", request)
        # Exactly what ExecuteTools does with the header the gRPC adapter sends.
        bound = ToolsPrincipal.from_metadata(((PRINCIPAL_HEADER, principal.header()),))
        response = await _call(
            lambda left: self._service.execute_tools(request, bound, Deadline.after(left)),
            timeout_s,
            TOOLS,
        )
        return tool_outcomes(response)


class InProcessBackends:
    """The inference and tools services in this process, behind local ports."""

    def __init__(self, inference: InferenceService, tools: ToolsService) -> None:
        self.inference_service = inference
        self.tools_service = tools
        self.inference = LocalInference(inference.core, inference.request_checks())
        self.tools = LocalTools(tools, tools.request_checks())

    @classmethod
    def from_settings(
        cls,
        inference: InferenceSettings,
        tools: ToolsSettings,
        *,
        device: str = "cpu",
        registry: CollectorRegistry | None = None,
    ) -> InProcessBackends:
        """Both services as their own processes would build them; ``registry``: one metrics
        registry for both (the process's /metrics)."""
        return cls(
            InferenceService(inference, device=device, registry=registry),
            ToolsService(tools, metrics_registry=registry),
        )

    async def start(self, health: HealthReporter | None = None) -> None:
        """The tool service (stores, seeded data, embedding model), then the engines; lane
        health goes to ``health`` (the hosting server's), like the inference server's."""
        health = health or HealthReporter(health_aio.HealthServicer())
        await self.tools_service.warm_up(health)
        await self.inference_service.warm_up(health)

    async def close(self) -> None:
        try:
            await self.inference_service.close()
        finally:
            await self.tools_service.close()


def main() -> int:
    from services.inference.machine import detect_device
    from services.orchestrator.config import OrchestratorSettings
    from services.orchestrator.service import OrchestratorService
    from services.tools.config import enforce_offline_models
    from shared.config import load_settings
    from shared.server import run_service

    enforce_offline_models()
    settings = load_settings(OrchestratorSettings, "orchestrator")
    registry = CollectorRegistry()
    backends = InProcessBackends.from_settings(
        load_settings(InferenceSettings, "inference"),
        load_settings(ToolsSettings, "tools"),
        device=detect_device(),
        registry=registry,
    )
    service = OrchestratorService(settings, backends=backends, metrics_registry=registry)
    return run_service(service, settings)


if __name__ == "__main__":  # vLLM spawns its engine-core process: keep the guard
    raise SystemExit(main())
