"""The one server bootstrap every agentmesh service uses.

grpc.aio on uvloop; the standard health service (NOT_SERVING until the service reports
warm); reflection so grpcurl needs no proto files; the interceptor chain; Prometheus
``/metrics``; and an orderly stop: SIGTERM -> health NOT_SERVING -> drain -> ``stop(grace)``
(in-flight calls finish, new ones get UNAVAILABLE) -> close backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from shared.auth import Authenticator
from shared.config import ServiceSettings
from shared.cpu_affinity import pin_process
from shared.guard import RequestChecks, RequestGuardInterceptor
from shared.health import HealthReporter
from shared.interceptors import DrainInterceptor, default_interceptors
from shared.logging import configure_logging
from shared.metrics import MetricsHttpServer, RpcMetrics
from shared.telemetry import Telemetry
from shared.tls import check_plaintext, server_credentials

log = logging.getLogger("agentmesh.server")


class Service(Protocol):
    """What a service hands to the bootstrap."""

    name: str
    service_names: Sequence[str]
    # The service's own metrics land here; /metrics serves it with the RPC metrics.
    metrics_registry: CollectorRegistry

    def register(self, server: grpc.aio.Server) -> None:
        """Add the service's servicers to ``server``."""

    # Optional: ``def request_checks(self) -> RequestChecks`` (full method name -> a check
    # that raises InvalidArgument), run on the decoded request before the handler.

    async def warm_up(self, health: HealthReporter) -> None:
        """Load models, open stores; return when ready to serve."""

    async def close(self) -> None:
        """Close backends; called after the server stopped."""


def service_request_checks(service: Service) -> RequestChecks:
    """The service's per-method request checks (optional ``request_checks()`` method)."""
    method = getattr(service, "request_checks", None)
    checks: RequestChecks = method() if callable(method) else {}
    return checks


def security_summary(settings: ServiceSettings, authenticator: Authenticator) -> list[str]:
    """What a service says at start-up about its transport and callers."""
    if settings.tls is None:
        transport = f"transport: PLAINTEXT on {settings.host} (no tls configured)"
    else:
        mutual = settings.tls.ca_file is not None and settings.tls.require_client_cert
        transport = f"transport: TLS{' with client certificates (mTLS)' if mutual else ''}"
    if authenticator.enabled:
        auth = settings.auth
        exempt = [
            n
            for n, on in (("health", auth.health_exempt), ("reflection", auth.reflection_exempt))
            if on
        ]
        caller = (
            f"auth: bearer tokens ({len(auth.static_keys) + bool(settings.auth_token)} static keys"
            f"{', JWKS ' + str(auth.jwks_file) if auth.jwks_file else ''}); exempt: "
            f"{', '.join(exempt) or 'nothing'}"
        )
    else:
        caller = "auth: OFF (no static keys or JWKS configured): every caller has every scope"
    return [transport, caller]


class GrpcServer:
    """One running service: gRPC server, health, reflection, metrics, lifecycle."""

    def __init__(
        self,
        service: Service,
        settings: ServiceSettings,
        *,
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.service = service
        # A service that traces exposes its Telemetry; the server spans join its traces.
        self.telemetry: Telemetry | None = getattr(service, "telemetry", None)
        self.settings = settings
        self.metrics_registry = metrics_registry or service.metrics_registry
        self._rpc_metrics = RpcMetrics(self.metrics_registry)
        self._health_servicer = health_aio.HealthServicer()
        self.health = HealthReporter(self._health_servicer)
        token = settings.auth_token.get_secret_value() if settings.auth_token else None
        self.authenticator = Authenticator(settings.auth, token)
        guard = RequestGuardInterceptor(settings.limits, service_request_checks(service))
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ]
        self._drain = DrainInterceptor()
        self._server = grpc.aio.server(
            interceptors=[
                *(self.telemetry.server_interceptors() if self.telemetry else []),
                *default_interceptors(self._rpc_metrics, self._drain, self.authenticator, guard),
                *extra_interceptors,
            ],
            options=options,
        )
        self._metrics_http: MetricsHttpServer | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self._serving = asyncio.Event()
        self._warm_failed: BaseException | None = None
        self._stopped = False
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def metrics_port(self) -> int:
        return self._metrics_http.port if self._metrics_http else 0

    async def start(self) -> int:
        """Bind and start serving health/reflection now; warm the service in the background."""
        self.service.register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health_servicer, self._server)
        names = [
            *self.service.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self._server)
        self.port = self._bind()
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.settings.host}:{self.settings.port}")
        await self.health.set_all(["", *self.service.service_names], serving=False)
        await self._server.start()
        if self.settings.metrics_port > 0:
            self._metrics_http = MetricsHttpServer(
                self.metrics_registry, self.settings.host, self.settings.metrics_port
            )
            self._metrics_http.start()
        log.info("%s listening on %s", self.service.name, self.address)
        for line in security_summary(self.settings, self.authenticator):
            log.log(
                logging.WARNING if "PLAINTEXT" in line or "OFF" in line else logging.INFO,
                "%s %s",
                self.service.name,
                line,
            )
        self._warm_task = asyncio.create_task(self._warm_up(), name=f"{self.service.name}-warm-up")
        return self.port

    def _bind(self) -> int:
        address = f"{self.settings.host}:{self.settings.port}"
        if self.settings.tls is not None:
            return self._server.add_secure_port(address, server_credentials(self.settings.tls))
        check_plaintext(self.service.name, self.settings.host, self.settings.allow_plaintext)
        return self._server.add_insecure_port(address)

    async def _warm_up(self) -> None:
        try:
            await self.service.warm_up(self.health)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self._warm_failed = error
            log.exception("%s failed to warm up; staying NOT_SERVING", self.service.name)
            self._serving.set()
            return
        await self.health.set_all(["", *self.service.service_names], serving=True)
        log.info("%s is SERVING", self.service.name)
        self._serving.set()

    async def wait_until_serving(self, timeout: float | None = None) -> None:
        """Return once warm; raise if warm-up failed."""
        await asyncio.wait_for(self._serving.wait(), timeout)
        if self._warm_failed is not None:
            raise RuntimeError(f"{self.service.name} failed to warm up") from self._warm_failed

    @property
    def warm_up_failed(self) -> bool:
        return self._warm_failed is not None

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING -> drain -> stop(grace) -> close backends. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("%s stopping (grace %.1fs)", self.service.name, grace)
        await self.health.enter_shutdown()
        if self.settings.drain_seconds > 0:
            await asyncio.sleep(self.settings.drain_seconds)
        self._drain.start_draining()
        started = time.monotonic()
        if not await self._drain.wait_idle(grace):
            log.warning("%d calls still in flight after %.1fs", self._drain.in_flight, grace)
        await self._server.stop(max(0.0, grace - (time.monotonic() - started)))
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
            with contextlib.suppress(BaseException):
                await self._warm_task
        try:
            await self.service.close()
        finally:
            if self._metrics_http is not None:
                self._metrics_http.stop()
        log.info("%s stopped", self.service.name)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve(
    service: Service,
    settings: ServiceSettings,
    on_serving: Callable[[GrpcServer], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then stop in order. Returns the process exit code.

    ``on_serving`` runs once the service is warm (tests and ``agentmesh up`` learn ports).
    """
    server = GrpcServer(service, settings)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await server.start()

    async def announce() -> None:
        with contextlib.suppress(RuntimeError):
            await server.wait_until_serving()
            if on_serving is not None:
                on_serving(server)

    announcer = asyncio.create_task(announce())
    await stop_requested.wait()
    announcer.cancel()
    await server.stop()
    if server.telemetry is not None:
        server.telemetry.shutdown()  # flush the exporter's last batch
    return 1 if server.warm_up_failed else 0


def run_service(service: Service, settings: ServiceSettings) -> int:
    """Blocking entry point for ``python -m services.<name>``: logging, the process's CPU
    cores (``cpu_affinity``), uvloop, serve."""
    import uvloop

    configure_logging(settings.log_level, settings.log_format, service.name)
    cores = settings.pinned_cores()
    if cores is not None:
        pin_process(cores, what=service.name)
    code: int = uvloop.run(serve(service, settings))
    return code
