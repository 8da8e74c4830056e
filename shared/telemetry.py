"""OpenTelemetry for one process: a tracer provider with the configured exporter, the gRPC
server and client interceptors (``opentelemetry-instrumentation-grpc``) that carry the trace
context between the services, and redaction of everything exported.

No global provider is installed: each service builds a :class:`Telemetry` from its settings
and hands it to the server bootstrap, its client channels and its own code. Exporter ``none``
(the default) builds no provider at all: spans are non-recording and cost nothing.

See the traces of ``make run`` in its terminal::

    AGENTMESH_INFERENCE_TELEMETRY__EXPORTER=console AGENTMESH_TOOLS_TELEMETRY__EXPORTER=console \
    AGENTMESH_ORCHESTRATOR_TELEMETRY__EXPORTER=console make run
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.util.types import AttributeValue
from pydantic import BaseModel, Field

from shared import semconv
from shared.redaction import redact

Exporter = Literal["none", "console", "otlp_grpc", "otlp_http"]
HEALTH_AND_REFLECTION = ("grpc.health.", "grpc.reflection.")


class TelemetrySettings(BaseModel):
    """Tracing of one service (``<service>.telemetry`` in YAML, ``..._TELEMETRY__*`` in env)."""

    exporter: Exporter = "none"
    # OTLP collector: host:port for gRPC (default localhost:4317), a URL for HTTP
    # (default http://localhost:4318/v1/traces). Unset: the exporter's own default / env.
    endpoint: str | None = None
    # Fraction of new traces kept (a caller's sampling decision is always followed).
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # Message content (user text, answers, tool arguments and results) on spans; off by
    # default. E-mail addresses, phone and card numbers are redacted either way.
    capture_content: bool = False


def _redacted(value: AttributeValue) -> AttributeValue:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, tuple | list) and all(isinstance(v, str) for v in value):
        return tuple(redact(str(v)) for v in value)
    return value


def redact_span(span: ReadableSpan) -> ReadableSpan:
    """A copy of ``span`` whose string attributes, event attributes and status text are
    redacted."""
    attributes = {k: _redacted(v) for k, v in (span.attributes or {}).items()}
    events = [
        Event(
            e.name,
            {k: _redacted(v) for k, v in (e.attributes or {}).items()},
            e.timestamp,
        )
        for e in span.events
    ]
    status = span.status
    if status.description:
        status = trace.Status(status.status_code, redact(status.description))
    return ReadableSpan(
        name=redact(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class RedactingExporter(SpanExporter):
    """Redacts every span before the wrapped exporter sees it."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export([redact_span(s) for s in spans])

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def make_exporter(settings: TelemetrySettings) -> SpanExporter | None:
    if settings.exporter == "console":
        return ConsoleSpanExporter()
    if settings.exporter == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=settings.endpoint, insecure=True)
    if settings.exporter == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=settings.endpoint)
    return None


class Telemetry:
    """The tracing of one process (or, in tests, of a mesh in one process)."""

    def __init__(
        self,
        provider: TracerProvider | None = None,
        *,
        capture_content: bool = False,
    ) -> None:
        self.provider = provider
        self.capture_content = capture_content
        self.tracer: trace.Tracer = (
            provider.get_tracer("agentmesh", schema_url=semconv.SCHEMA_URL)
            if provider is not None
            else trace.NoOpTracer()
        )

    @classmethod
    def from_settings(cls, settings: TelemetrySettings, service_name: str) -> Telemetry:
        exporter = make_exporter(settings)
        if exporter is None:
            return cls(capture_content=settings.capture_content)
        provider = _provider(service_name, settings.sample_ratio)
        processor = (
            SimpleSpanProcessor(RedactingExporter(exporter))
            if settings.exporter == "console"
            else BatchSpanProcessor(RedactingExporter(exporter))
        )
        provider.add_span_processor(processor)
        return cls(provider, capture_content=settings.capture_content)

    @classmethod
    def with_exporter(
        cls,
        exporter: SpanExporter,
        service_name: str = "agentmesh",
        *,
        capture_content: bool = False,
    ) -> Telemetry:
        """Every span to ``exporter`` as it ends, redacted (tests: an in-memory exporter)."""
        provider = _provider(service_name, 1.0)
        provider.add_span_processor(SimpleSpanProcessor(RedactingExporter(exporter)))
        return cls(provider, capture_content=capture_content)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def server_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return [
            aio_server_interceptor(  # type: ignore[no-untyped-call]
                tracer_provider=self.provider,
                filter_=_not_probes(filters),
            )
        ]

    def client_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

        interceptors: list[Any] = aio_client_interceptors(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider,
            filter_=_not_probes(filters),
        )
        return interceptors

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def _not_probes(filters: Any) -> Any:
    """No spans for health checks and reflection (probes would flood the traces)."""
    return filters.negate(
        filters.any_of(*(filters.service_prefix(p) for p in HEALTH_AND_REFLECTION))
    )


def _provider(service_name: str, ratio: float) -> TracerProvider:
    return TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.namespace": "agentmesh"}),
        sampler=ParentBased(TraceIdRatioBased(ratio)),
    )
