"""The standard grpc.health.v1 service, with per-name status the services control."""

from __future__ import annotations

from collections.abc import Iterable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """What a service may say about its health (overall "" and any names of its own)."""

    def __init__(self, servicer: health_aio.HealthServicer) -> None:
        self._servicer = servicer
        self._names: set[str] = {""}
        self._shutting_down = False

    @property
    def servicer(self) -> health_aio.HealthServicer:
        return self._servicer

    async def set_serving(self, name: str = "") -> None:
        if self._shutting_down:
            return
        self._names.add(name)
        await self._servicer.set(name, SERVING)

    async def set_not_serving(self, name: str = "") -> None:
        self._names.add(name)
        await self._servicer.set(name, NOT_SERVING)

    async def set_all(self, names: Iterable[str], serving: bool) -> None:
        for name in names:
            if serving:
                await self.set_serving(name)
            else:
                await self.set_not_serving(name)

    async def enter_shutdown(self) -> None:
        """Every name NOT_SERVING, and no later change back."""
        self._shutting_down = True
        await self._servicer.enter_graceful_shutdown()
