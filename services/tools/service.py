"""The ToolService gRPC servicer and the Service the shared bootstrap runs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2
from prometheus_client import CollectorRegistry

from services.tools.adapters.kb import Embedder
from services.tools.backends import Backends, open_backends
from services.tools.config import ToolsSettings
from services.tools.executor import CallResult, CallStatus, Invocation, ToolExecutor, ToolMetrics
from services.tools.handlers import Toolbox
from services.tools.principal import Principal
from services.tools.registry import Effect, Registry, default_registry
from services.tools.request_checks import tools_request_checks
from shared.deadlines import Deadline
from shared.errors import InvalidArgument, Unavailable
from shared.guard import RequestChecks
from shared.health import HealthReporter
from shared.telemetry import Telemetry

log = logging.getLogger("agentmesh.tools")

SERVICE_NAME = tools_pb2.DESCRIPTOR.services_by_name["ToolService"].full_name

_STATUS_PB = {
    CallStatus.OK: tools_pb2.TOOL_RESULT_STATUS_OK,
    CallStatus.INVALID_ARGUMENT: tools_pb2.TOOL_RESULT_STATUS_INVALID_ARGUMENT,
    CallStatus.NOT_FOUND: tools_pb2.TOOL_RESULT_STATUS_NOT_FOUND,
    CallStatus.FAILED_PRECONDITION: tools_pb2.TOOL_RESULT_STATUS_FAILED_PRECONDITION,
    CallStatus.UNAVAILABLE: tools_pb2.TOOL_RESULT_STATUS_UNAVAILABLE,
    CallStatus.DEADLINE_EXCEEDED: tools_pb2.TOOL_RESULT_STATUS_DEADLINE_EXCEEDED,
    CallStatus.INTERNAL: tools_pb2.TOOL_RESULT_STATUS_INTERNAL,
    CallStatus.CANCELLED: tools_pb2.TOOL_RESULT_STATUS_CANCELLED,
    CallStatus.PERMISSION_DENIED: tools_pb2.TOOL_RESULT_STATUS_PERMISSION_DENIED,
}
_EFFECT_PB = {
    Effect.READ: common_pb2.TOOL_EFFECT_READ,
    Effect.WRITE: common_pb2.TOOL_EFFECT_WRITE,
}


def spec_to_pb(registry: Registry) -> list[common_pb2.ToolSpec]:
    return [
        common_pb2.ToolSpec(
            name=tool.name,
            description=tool.description,
            parameters_json_schema=tool.parameters_json,
            effect=_EFFECT_PB[tool.effect],
            timeout_ms=tool.timeout_ms,
            principal_arguments=list(tool.principal_arguments),
            requires_customer=tool.requires_customer,
        )
        for tool in registry
    ]


def invocation_from_pb(message: tools_pb2.ToolInvocation) -> Invocation:
    return Invocation(
        call_id=message.call_id,
        name=message.name,
        arguments_json=message.arguments_json,
        idempotency_key=message.idempotency_key,
        timeout_ms=message.timeout_ms,
    )


def result_to_pb(result: CallResult) -> tools_pb2.ToolResult:
    started = timestamp_pb2.Timestamp()
    started.FromNanoseconds(int(result.started_at * 1e9))
    finished = timestamp_pb2.Timestamp()
    finished.FromNanoseconds(int(result.finished_at * 1e9))
    latency = duration_pb2.Duration()
    latency.FromNanoseconds(int(result.latency_s * 1e9))
    return tools_pb2.ToolResult(
        call_id=result.call_id,
        name=result.name,
        status=_STATUS_PB[result.status],
        error_message=result.error_message,
        result_json=result.result_json,
        fenced_result=result.fenced_result,
        truncated=result.truncated,
        latency=latency,
        started_at=started,
        finished_at=finished,
        effect=_EFFECT_PB[result.effect] if result.effect else common_pb2.TOOL_EFFECT_UNSPECIFIED,
        source=result.source,
        replayed=result.replayed,
    )


class ToolServicer(tools_pb2_grpc.ToolServiceServicer):  # type: ignore[misc]
    def __init__(self, service: ToolsService) -> None:
        self._service = service

    async def ListTools(
        self, request: tools_pb2.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools_pb2.ListToolsResponse:
        return self._service.list_tools()

    async def ExecuteTool(
        self, request: tools_pb2.ExecuteToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools_pb2.ExecuteToolResponse:
        principal = Principal.from_metadata(context.invocation_metadata())
        if not request.HasField("invocation"):
            raise InvalidArgument("invocation", "is required")
        result = await self._service.executor().execute(
            invocation_from_pb(request.invocation), principal
        )
        if result.error is not None:
            raise result.error
        if result.status is not CallStatus.OK:
            raise RuntimeError("tool call failed")  # INTERNAL, without detail
        return tools_pb2.ExecuteToolResponse(result=result_to_pb(result))

    async def ExecuteTools(
        self, request: tools_pb2.ExecuteToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools_pb2.ExecuteToolsResponse:
        principal = Principal.from_metadata(context.invocation_metadata())
        return await self._service.execute_tools(request, principal)


class ToolsService:
    """The tool service for :func:`shared.server.run_service`.

    Backends can be injected (tests, benchmarks); otherwise ``warm_up`` opens the ones the
    settings name, seeds demo data into empty stores and loads the embedding model.
    """

    name = "tools"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(
        self,
        settings: ToolsSettings,
        *,
        metrics_registry: CollectorRegistry | None = None,
        backends: Backends | None = None,
        registry: Registry | None = None,
        embedder: Embedder | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry or Telemetry.from_settings(settings.telemetry, self.name)
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.registry = registry or default_registry(allow_email_lookup=settings.allow_email_lookup)
        self._metrics = ToolMetrics(self.metrics_registry)
        self._backends = backends
        self._owns_backends = backends is None
        self._embedder = embedder
        self._executor: ToolExecutor | None = None

    def request_checks(self) -> RequestChecks:
        return tools_request_checks(self.settings.limits)

    def register(self, server: grpc.aio.Server) -> None:
        tools_pb2_grpc.add_ToolServiceServicer_to_server(ToolServicer(self), server)

    async def warm_up(self, health: HealthReporter) -> None:
        if self._backends is None:
            self._backends = await open_backends(self.settings, embedder=self._embedder)
        backends = self._backends
        toolbox = Toolbox(backends.crm, backends.kb, backends.billing)
        self._executor = ToolExecutor(
            self.registry,
            toolbox.handlers(),
            metrics=self._metrics,
            max_output_tokens=self.settings.max_output_tokens,
            sources=toolbox.sources(),
            tracer=self.telemetry.tracer,
        )
        log.info(
            "tool registry %s ready: %s", self.registry.version, ", ".join(self.registry.names())
        )

    def executor(self) -> ToolExecutor:
        if self._executor is None:
            raise Unavailable("the tool service is still warming up")
        return self._executor

    # What ListTools and ExecuteTools answer; the in-process adapter of the orchestrator
    # (services/orchestrator/inprocess.py) calls these too.

    def list_tools(self) -> tools_pb2.ListToolsResponse:
        return tools_pb2.ListToolsResponse(
            tools=spec_to_pb(self.registry), registry_version=self.registry.version
        )

    async def execute_tools(
        self,
        request: tools_pb2.ExecuteToolsRequest,
        principal: Principal,
        deadline: Deadline | None = None,
    ) -> tools_pb2.ExecuteToolsResponse:
        """The batch, concurrently, on behalf of ``principal`` (every principal-bound argument
        bound to it); ``deadline``: the caller's (else the serving RPC's)."""
        results = await self.executor().execute_many(
            [invocation_from_pb(inv) for inv in request.invocations], principal, deadline
        )
        return tools_pb2.ExecuteToolsResponse(results=[result_to_pb(r) for r in results])

    async def close(self) -> None:
        if self._backends is not None and self._owns_backends:
            await self._backends.close()
        self._backends = None
        self._executor = None
