"""gRPC surface of the inference service, and the Service the shared bootstrap runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from agentmesh.inference.v1 import inference_pb2 as pb
from agentmesh.inference.v1 import inference_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from services.inference.config import InferenceSettings, LanesConfig, apply_engine_environment
from services.inference.core import InferenceCore
from services.inference.engine import EngineFactory, vllm_engine_factory
from services.inference.engine_stats import EngineStats
from services.inference.lanes import EngineDeathHook
from services.inference.model_prep import resolve_model
from services.inference.placement import ProcessPlacement
from services.inference.request_checks import inference_request_checks
from shared.guard import RequestChecks
from shared.health import HealthReporter
from shared.telemetry import Telemetry

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name


def lane_health_name(lane: str) -> str:
    """Per-lane health name, e.g. ``agentmesh.inference.v1.InferenceService/workhorse``."""
    return f"{SERVICE_NAME}/{lane}"


class InferenceServicer(pb_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """Thin: request in, core call, response out. Errors are mapped by the interceptors."""

    def __init__(self, core: InferenceCore) -> None:
        self._core = core

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        return await self._core.generate(request)

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        async for item in self._core.stream_generate(request):
            yield item

    async def CallTools(
        self, request: pb.CallToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CallToolsResponse:
        return await self._core.call_tools(request)

    async def ListLanes(
        self, request: pb.ListLanesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListLanesResponse:
        return self._core.list_lanes()

    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CountTokensResponse:
        return await self._core.count_tokens(request)


class InferenceService:
    """Implements shared.server.Service: engines start in warm_up, lanes get health names."""

    name = "inference"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(
        self,
        settings: InferenceSettings,
        lanes: LanesConfig | None = None,
        engine_factory: EngineFactory | None = None,
        device: str = "cpu",
        registry: CollectorRegistry | None = None,
        on_engine_death: EngineDeathHook | None = None,
        watch_interval_s: float = 1.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        # Called once per engine that dies after serving; `python -m services.inference` passes
        # one that stops the process with a non-zero exit (its supervisor restarts it).
        self._on_engine_death = on_engine_death
        self._watch_interval_s = watch_interval_s
        self.lanes_config = lanes or settings.load_lanes()
        self._device = device
        # Lane metrics (TTFT, tokens, rejections, call outcomes) and engine state; the
        # bootstrap serves this registry on /metrics together with the RPC metrics.
        self.metrics_registry = registry or CollectorRegistry()
        self.engine_stats = EngineStats(self.metrics_registry)
        self.telemetry = telemetry or Telemetry.from_settings(settings.telemetry, self.name)
        # This process's cores around its engines' starts (cpu_affinity "auto").
        self.placement = ProcessPlacement()
        if engine_factory is None:
            models_dir = settings.models_dir()

            def resolve(ref: str) -> str:
                return resolve_model(ref, models_dir)

            engine_factory = vllm_engine_factory(
                resolve,
                settings.engine_start_timeout_s,
                "cuda" if device == "gpu" else "cpu",
                stats=self.engine_stats,
                kv_cache_gib=settings.kvcache_gib(),
                cpu_threads_bind=settings.cpu_omp_threads_bind,
                cpu_affinity=settings.cpu_affinity,
                placement=self.placement,
            )
            self._real_engines = True
        else:
            self._real_engines = False
        self.core = InferenceCore(
            self.lanes_config, settings, engine_factory, self.metrics_registry
        )
        self._watch_task: asyncio.Task[None] | None = None
        self._warm = False

    def request_checks(self) -> RequestChecks:
        return inference_request_checks(self.settings.limits)

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.core), server)

    async def warm_up(self, health: HealthReporter) -> None:
        for lane in self.core.lanes:
            await health.set_not_serving(lane_health_name(lane))

        async def on_state(lane: str, serving: bool, any_serving: bool) -> None:
            if serving:
                await health.set_serving(lane_health_name(lane))
            else:
                await health.set_not_serving(lane_health_name(lane))
            if self._warm:
                # After warm-up the service as a whole serves while any lane does.
                await health.set_all(["", *self.service_names], serving=any_serving)

        if self._real_engines:
            apply_engine_environment(self.settings, "gpu" if self._device == "gpu" else "cpu")
        await self.core.start(on_state, self._on_engine_death)
        self._warm = True
        self._watch_task = asyncio.create_task(
            self.core.watch(self._watch_interval_s), name="inference-engine-watch"
        )

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        try:
            await self.core.close()
        finally:
            self.placement.restore()
