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
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from agentmesh.inference.v1 import inference_pb2
from agentmesh.tools.v1 import tools_pb2
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from services.inference.config import InferenceSettings
from services.inference.core import InferenceCore
from services.inference.service import InferenceService
from services.orchestrator.adapters import InferenceAdapter, Metadata, ToolsAdapter
from services.orchestrator.downstream import (
    INFERENCE,
    INFERENCE_SERVICE,
    TOOLS,
    TOOLS_SERVICE,
    capacity_delay,
    method,
    retry_capacity,
)
from services.tools.config import ToolsSettings
from services.tools.principal import Principal as ToolsPrincipal
from services.tools.service import ToolsService
from shared.deadlines import Deadline
from shared.errors import AgentmeshError, DeadlineExceeded, ResourceExhausted, Unavailable
from shared.guard import RequestChecks
from shared.health import HealthReporter

T = TypeVar("T")

log = logging.getLogger("agentmesh.orchestrator")


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


class LocalInference(_Checked, InferenceAdapter):
    """InferencePort over the inference service's core, in this process."""

    def __init__(self, core: InferenceCore, checks: RequestChecks | None = None) -> None:
        super().__init__(INFERENCE_SERVICE, checks)
        self._core = core

    async def _generate(
        self, request: inference_pb2.GenerateRequest, timeout_s: float
    ) -> inference_pb2.GenerateResponse:
        self.check("Generate", request)
        return await _call(lambda _: self._core.generate(request), timeout_s, INFERENCE)

    async def _call_tools(
        self, request: inference_pb2.CallToolsRequest, timeout_s: float
    ) -> inference_pb2.CallToolsResponse:
        self.check("CallTools", request)
        return await _call(lambda _: self._core.call_tools(request), timeout_s, INFERENCE)

    async def _stream_generate(
        self, request: inference_pb2.StreamGenerateRequest, timeout_s: float
    ) -> AsyncGenerator[inference_pb2.StreamGenerateResponse, None]:
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
                yield reply
                reply = await _next(stream, deadline)
        finally:
            # A no-op once the stream ended; aborts the engine request otherwise.
            await stream.aclose()

    async def _count_tokens(
        self, request: inference_pb2.CountTokensRequest, timeout_s: float
    ) -> inference_pb2.CountTokensResponse:
        self.check("CountTokens", request)
        return await _call(lambda _: self._core.count_tokens(request), timeout_s, INFERENCE)


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


class LocalTools(_Checked, ToolsAdapter):
    """ToolsPort over the tool service, in this process."""

    def __init__(self, service: ToolsService, checks: RequestChecks | None = None) -> None:
        super().__init__(TOOLS_SERVICE, checks)
        self._service = service

    async def _list_tools(self, timeout_s: float) -> tools_pb2.ListToolsResponse:
        return self._service.list_tools()

    async def _execute_tools(
        self, request: tools_pb2.ExecuteToolsRequest, metadata: Metadata, timeout_s: float
    ) -> tools_pb2.ExecuteToolsResponse:
        self.check("ExecuteTools", request)
        # Exactly what ExecuteTools does with the RPC's metadata.
        principal = ToolsPrincipal.from_metadata(metadata)
        return await _call(
            lambda left: self._service.execute_tools(request, principal, Deadline.after(left)),
            timeout_s,
            TOOLS,
        )


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
