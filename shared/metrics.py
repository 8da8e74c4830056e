"""Prometheus metrics: one registry per server (no module globals), served over HTTP."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

RPC_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 5, 7, 10, 20, 30, 60)


@dataclass
class RpcMetrics:
    """The per-RPC metrics every service exports."""

    registry: CollectorRegistry
    requests: Counter = field(init=False)
    latency: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "agentmesh_rpc_requests",
            "RPCs handled, by method and final status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "agentmesh_rpc_latency_seconds",
            "Wall time of handled RPCs (streams: until the last message).",
            ["service", "method"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=self.registry,
        )


class MetricsHttpServer:
    """``/metrics`` over HTTP in a daemon thread (prometheus-client's own server)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_port if self._server is not None else 0

    def start(self) -> None:
        self._server, self._thread = start_http_server(
            self._port, addr=self._host, registry=self._registry
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
