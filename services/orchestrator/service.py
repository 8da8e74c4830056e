"""The orchestrator as a shared.server Service: channels to inference and tools, the session
store, the turn runner and the AgentService servicer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from agentmesh.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from services.orchestrator.access import SessionAccess
from services.orchestrator.agent import Agent
from services.orchestrator.clients import (
    INFERENCE_RETRY_METHODS,
    INFERENCE_SERVICE,
    TOOLS_RETRY_METHODS,
    TOOLS_SERVICE,
    GrpcInference,
    GrpcTools,
)
from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.loop.ports import InferencePort, ToolsPort
from services.orchestrator.loop.runner import TurnRunner
from services.orchestrator.loop.trace import Tracers, TurnTracer
from services.orchestrator.metrics import OrchestratorMetrics
from services.orchestrator.replay.recorder import TurnRecorder
from services.orchestrator.request_checks import orchestrator_request_checks
from services.orchestrator.servicer import AgentServicer
from services.orchestrator.sessions.base import SessionStore
from services.orchestrator.sessions.factory import store_from_url
from services.orchestrator.topology.directory import LaneDirectory
from services.orchestrator.topology.routed import RoutedInference
from services.orchestrator.tracing import OtelTurnTracer
from services.orchestrator.turn_tools import RecordedTools
from shared.channels import channel_from_settings
from shared.config import ClientSettings
from shared.guard import RequestChecks
from shared.health import HealthReporter
from shared.telemetry import Telemetry

if TYPE_CHECKING:
    from services.orchestrator.inprocess import InProcessBackends

log = logging.getLogger("agentmesh.orchestrator")

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


def _channel(
    client: ClientSettings, retry: Sequence[tuple[str, str | None]], telemetry: Telemetry
) -> grpc.aio.Channel:
    """TLS and token from settings; client spans and trace context when tracing is on."""
    return channel_from_settings(client, retry_methods=retry, telemetry=telemetry)


class OrchestratorService:
    name = "orchestrator"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(
        self,
        settings: OrchestratorSettings,
        *,
        store: SessionStore | None = None,
        metrics_registry: CollectorRegistry | None = None,
        directory: LaneDirectory | None = None,
        telemetry: Telemetry | None = None,
        backends: InProcessBackends | None = None,
    ) -> None:
        """``backends``: the inference and tools services in this process (the whole agent
        in one process, services/orchestrator/inprocess.py) instead of channels to them."""
        self.settings = settings
        self.telemetry = telemetry or Telemetry.from_settings(settings.telemetry, self.name)
        # Pass the same registry to GrpcServer so /metrics exports these series.
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = OrchestratorMetrics(
            self.metrics_registry, active_window_s=settings.active_session_window_s
        )
        self.store = store or store_from_url(
            settings.resolved_store_url(), prefix=settings.session_store_prefix
        )
        self._channels: list[grpc.aio.Channel] = []
        self.backends = backends
        # Built from settings.topology in register() unless given (tests pass their own).
        self.directory: LaneDirectory | None = directory
        self._servicer: AgentServicer | None = None
        self.agent: Agent | None = None

    def register(self, server: grpc.aio.Server) -> None:
        inference, tools = self._ports()
        self.agent = build_agent(self.settings, self.store, inference, tools, self.telemetry)
        access = SessionAccess(self.settings.caps, self.settings.ceilings.caps)
        self._servicer = AgentServicer(self.agent, self.metrics, access)
        orchestrator_pb2_grpc.add_AgentServiceServicer_to_server(self._servicer, server)

    def _ports(self) -> tuple[InferencePort, ToolsPort]:
        """The in-process backends' ports, else gRPC clients over channels (the lane
        directory's when a topology is configured)."""
        if self.backends is not None:
            return self.backends.inference, self.backends.tools
        settings = self.settings
        inference_channel = _channel(settings.inference, INFERENCE_RETRY_METHODS, self.telemetry)
        tools_channel = _channel(settings.tools, TOOLS_RETRY_METHODS, self.telemetry)
        self._channels = [inference_channel, tools_channel]
        tools = GrpcTools(tools_channel)
        inference: GrpcInference | RoutedInference = GrpcInference(inference_channel)
        if self.directory is None and settings.topology.enabled:
            self.directory = LaneDirectory(
                settings.topology,
                lambda target: _channel(
                    settings.inference.model_copy(update={"target": target}),
                    INFERENCE_RETRY_METHODS,
                    self.telemetry,
                ),
            )
        if self.directory is not None:
            inference = RoutedInference(self.directory, settings.profile.lane_ladder)
        return inference, tools

    def request_checks(self) -> RequestChecks:
        return orchestrator_request_checks(self.settings.limits)

    async def warm_up(self, health: HealthReporter) -> None:
        """Open the store, wait for inference and tools to be SERVING (or start them, in
        process), read the registry."""
        assert self.agent is not None and self._servicer is not None
        await self.store.open()
        if self.backends is not None:
            await self.backends.start(health)
        else:
            inference_channel, tools_channel = self._channels
            wait_s = self.settings.dependency_wait_s
            await asyncio.gather(
                _wait_serving(tools_channel, TOOLS_SERVICE, wait_s),
                self._wait_inference(inference_channel, wait_s),
            )
        registry = await self.agent.registry()
        log.info("tool registry: %s", ", ".join(t.name for t in registry))
        self._servicer.ready = True

    async def _wait_inference(self, channel: grpc.aio.Channel, wait_s: float) -> None:
        """One deployment: its health. Several: the first rung's pool live, every target
        hosting the lanes it is configured for (a wrong topology refuses to start)."""
        if self.directory is None:
            await _wait_serving(channel, INFERENCE_SERVICE, wait_s)
            return
        ladder = [
            lane for lane in self.settings.profile.lane_ladder if lane in self.directory.lanes
        ]
        await self.directory.wait_live(ladder[0] if ladder else self.directory.lanes[0], wait_s)
        problems = self.directory.problems()
        if problems:
            raise ValueError(
                "inference topology does not match the deployments: " + "; ".join(problems)
            )
        log.info("lane directory: %s", self.directory.describe())
        self.directory.start()

    async def close(self) -> None:
        if self.directory is not None:
            await self.directory.close()
        for channel in self._channels:
            await channel.close()
        try:
            await self.store.close()
        finally:
            if self.backends is not None:
                await self.backends.close()


def build_agent(
    settings: OrchestratorSettings,
    store: SessionStore,
    inference: InferencePort,
    tools: ToolsPort,
    telemetry: Telemetry,
) -> Agent:
    """The agent over ``inference`` and ``tools`` (gRPC clients or in-process ports): the
    turn runner with its tracers, finished tool calls recorded per turn in ``store``."""
    tracers: list[TurnTracer] = [OtelTurnTracer(telemetry)]
    if settings.record_turns_path is not None:
        tracers.append(TurnRecorder(settings.record_turns_path))
    recorded = RecordedTools(tools, store)
    runner = TurnRunner(inference, recorded, settings.profile, tracer=Tracers(tracers))
    return Agent(
        store,
        runner,
        tools,
        settings.caps,
        ceilings=settings.ceilings,
        lease_ttl_s=settings.lease_ttl_s,
        history_window_messages=settings.history_window_messages,
        turn_tools=recorded,
    )


async def _wait_serving(channel: grpc.aio.Channel, service: str, wait_s: float) -> None:
    """Polls the dependency's standard health service until it says SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service} did not become SERVING within {wait_s:.0f} s")
        await asyncio.sleep(delay)
        delay = min(1.0, delay * 2)
