"""Runs tool calls: principal binding, validation, per-call deadlines, concurrency, output
shaping, metrics.

Every call runs for a :class:`Principal` the caller passes in: :func:`bind_principal`
refuses tools an anonymous principal may not use and fills (or checks) the principal-bound
arguments before the schema is validated. Every call gets its own deadline, the earliest of
the tool's timeout, the invocation's ``timeout_ms`` and the RPC deadline; a batch runs all
calls concurrently and one failing call never fails the others: each gets its own status.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.tools.output import DEFAULT_MAX_OUTPUT_TOKENS, fence, shape_output
from services.tools.principal import Principal
from services.tools.registry import Effect, Registry, ToolDefinition
from shared import semconv as sc
from shared.deadlines import Deadline, current_deadline
from shared.errors import (
    AgentmeshError,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

log = logging.getLogger("agentmesh.tools")


class CallStatus(enum.Enum):
    OK = "ok"
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"
    CANCELLED = "cancelled"
    PERMISSION_DENIED = "permission_denied"


_STATUS_OF: list[tuple[type[AgentmeshError], CallStatus]] = [
    (InvalidArgument, CallStatus.INVALID_ARGUMENT),
    (NotFound, CallStatus.NOT_FOUND),
    (FailedPrecondition, CallStatus.FAILED_PRECONDITION),
    (Unavailable, CallStatus.UNAVAILABLE),
    (DeadlineExceeded, CallStatus.DEADLINE_EXCEEDED),
    (Cancelled, CallStatus.CANCELLED),
    (PermissionDenied, CallStatus.PERMISSION_DENIED),
]


@dataclass(frozen=True)
class Invocation:
    call_id: str
    name: str
    arguments_json: str
    idempotency_key: str = ""
    timeout_ms: int = 0


@dataclass(frozen=True)
class CallContext:
    """What a tool handler gets besides its arguments."""

    call_id: str
    idempotency_key: str
    deadline: Deadline
    principal: Principal


@dataclass(frozen=True)
class ToolOutput:
    data: Any
    source: str
    replayed: bool = False


ToolHandler = Callable[[dict[str, Any], CallContext], Awaitable[ToolOutput]]


@dataclass
class CallResult:
    call_id: str
    name: str
    status: CallStatus
    error_message: str = ""
    result_json: str = ""
    fenced_result: str = ""
    truncated: bool = False
    latency_s: float = 0.0
    started_at: float = 0.0  # wall clock (epoch seconds): comparable across calls
    finished_at: float = 0.0
    effect: Effect | None = None
    source: str = ""
    replayed: bool = False
    # The domain error behind a non-OK status (ExecuteTool re-raises it as the RPC status).
    error: AgentmeshError | None = field(default=None, repr=False)


class ToolMetrics:
    """Counters and histograms of the tool service, registered on the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "agentmesh_tool_calls",
            "Tool calls by tool and outcome.",
            ["tool", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "agentmesh_tool_call_latency_seconds",
            "Wall time of tool calls.",
            ["tool"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=registry,
        )
        self.truncated = Counter(
            "agentmesh_tool_output_truncated",
            "Tool results cut to the output token limit.",
            ["tool"],
            registry=registry,
        )
        self.replayed = Counter(
            "agentmesh_tool_writes_replayed",
            "Write calls answered from the idempotency store.",
            ["tool"],
            registry=registry,
        )


class ToolExecutor:
    """Validates and runs invocations against the registry's handlers."""

    def __init__(
        self,
        registry: Registry,
        handlers: Mapping[str, ToolHandler],
        *,
        metrics: ToolMetrics,
        max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
        sources: Mapping[str, str] | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._tracer = tracer or trace.NoOpTracer()
        missing = set(registry.names()) - set(handlers)
        if missing:
            raise ValueError(f"no handler for tools: {sorted(missing)}")
        self._registry = registry
        self._handlers = dict(handlers)
        self._metrics = metrics
        self._max_tokens = max_output_tokens
        # The adapter behind each tool ("billing:http"), shown even when a call fails.
        self._sources = {t.name: (sources or {}).get(t.name, t.source_kind) for t in registry}
        self._validators = {tool.name: Draft202012Validator(tool.parameters) for tool in registry}

    @property
    def registry(self) -> Registry:
        return self._registry

    async def execute_many(
        self,
        invocations: Sequence[Invocation],
        principal: Principal,
        rpc_deadline: Deadline | None = None,
    ) -> list[CallResult]:
        """All calls concurrently, all for ``principal``; results in the invocations' order."""
        deadline = rpc_deadline or current_deadline()
        return list(
            await asyncio.gather(*(self.execute(inv, principal, deadline) for inv in invocations))
        )

    async def execute(
        self,
        invocation: Invocation,
        principal: Principal,
        rpc_deadline: Deadline | None = None,
    ) -> CallResult:
        """One call, in an ``execute_tool {name}`` span; never raises for the call's own
        failure (see ``CallResult.status``)."""
        with self._tracer.start_as_current_span(
            sc.tool_span(invocation.name),
            attributes={
                sc.GEN_AI_OPERATION_NAME: sc.OP_EXECUTE_TOOL,
                sc.GEN_AI_TOOL_NAME: invocation.name,
                sc.GEN_AI_TOOL_CALL_ID: invocation.call_id,
                sc.GEN_AI_TOOL_TYPE: sc.TOOL_TYPE_FUNCTION,
            },
        ) as span:
            result = await self._execute(invocation, principal, rpc_deadline)
            span.set_attribute(sc.AM_TOOL_STATUS, result.status.value)
            span.set_attribute(sc.AM_TOOL_SOURCE, result.source)
            if result.status is not CallStatus.OK:
                span.set_attribute(sc.ERROR_TYPE, result.status.value)
                span.set_status(trace.Status(trace.StatusCode.ERROR, result.status.value))
            return result

    async def _execute(
        self,
        invocation: Invocation,
        principal: Principal,
        rpc_deadline: Deadline | None,
    ) -> CallResult:
        started_wall = time.time()
        started = time.monotonic()
        tool = self._registry.get(invocation.name)
        result = CallResult(
            call_id=invocation.call_id,
            name=invocation.name,
            status=CallStatus.OK,
            started_at=started_wall,
            effect=tool.effect if tool else None,
            source=self._sources.get(invocation.name, ""),
        )
        try:
            if tool is None:
                raise NotFound(f"no tool named {invocation.name!r}", reason="UNKNOWN_TOOL")
            arguments = self._validate(tool, invocation, principal)
            deadline = Deadline.after(tool.timeout_ms / 1000)
            if invocation.timeout_ms:
                deadline = deadline.within(invocation.timeout_ms / 1000)
            deadline = deadline.earliest(rpc_deadline or current_deadline())
            context = CallContext(
                invocation.call_id, invocation.idempotency_key, deadline, principal
            )
            remaining = deadline.time_remaining()
            if remaining <= 0:
                raise DeadlineExceeded("no time left for this call")
            try:
                async with asyncio.timeout(remaining):
                    output = await self._handlers[tool.name](arguments, context)
            except TimeoutError as exc:
                raise DeadlineExceeded(f"{tool.name} did not finish within its deadline") from exc
            shaped = shape_output(output.data, self._max_tokens)
            result.result_json = shaped.text
            result.truncated = shaped.truncated
            result.source = output.source
            result.replayed = output.replayed
            if shaped.truncated:
                self._metrics.truncated.labels(tool.name).inc()
            if output.replayed:
                self._metrics.replayed.labels(tool.name).inc()
        except AgentmeshError as error:
            result.status = _status_of(error)
            result.error_message = error.message
            result.error = error
            result.result_json = json.dumps({"error": error.message}, ensure_ascii=False)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("tool %s failed (call %s)", invocation.name, invocation.call_id)
            result.status = CallStatus.INTERNAL
            result.error_message = "the tool failed unexpectedly"
            result.result_json = json.dumps({"error": result.error_message})
        finished = time.monotonic()
        result.latency_s = finished - started
        result.finished_at = started_wall + result.latency_s
        result.fenced_result = fence(
            tool=invocation.name,
            call_id=invocation.call_id,
            source=result.source,
            status=result.status.value,
            body=result.result_json,
        )
        label = invocation.name if tool is not None else "_unknown"
        self._metrics.calls.labels(label, result.status.value).inc()
        self._metrics.latency.labels(label).observe(result.latency_s)
        return result

    def _validate(
        self, tool: ToolDefinition, invocation: Invocation, principal: Principal
    ) -> dict[str, Any]:
        raw = invocation.arguments_json.strip() or "{}"
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidArgument("arguments_json", "is not valid JSON") from exc
        if not isinstance(parsed, dict):
            raise InvalidArgument("arguments_json", "must be a JSON object")
        arguments = bind_principal(tool, parsed, principal)
        error = jsonschema.exceptions.best_match(self._validators[tool.name].iter_errors(arguments))
        if error is not None:
            raise InvalidArgument(_field_of(error), _describe(error))
        if tool.effect is Effect.WRITE and not invocation.idempotency_key.strip():
            raise InvalidArgument(
                "idempotency_key", f"{tool.name} changes state and needs an idempotency key"
            )
        if len(invocation.idempotency_key) > 200:
            raise InvalidArgument("idempotency_key", "must be at most 200 characters")
        return arguments


def bind_principal(
    tool: ToolDefinition, arguments: Mapping[str, Any], principal: Principal
) -> dict[str, Any]:
    """The arguments with every principal-bound one set to the principal's own value.

    An anonymous principal may not use a tool that requires a customer. A bound argument
    the caller left out is filled in; one that names someone else is NOT_FOUND with the
    same words whether or not that record exists, so nothing about it leaks.
    """
    if tool.requires_customer and principal.is_anonymous:
        raise PermissionDenied("this tool needs a signed-in customer")
    bound = dict(arguments)
    for name in tool.principal_arguments:
        value = principal.bound_value(name)
        if value is None:  # a principal with nothing to bind is never trusted with the tool
            raise PermissionDenied(f"this tool needs a principal that binds {name}")
        if name in bound and bound[name] != value:
            raise NotFound(f"nothing found for that {name}")
        bound[name] = value
    return bound


def _status_of(error: AgentmeshError) -> CallStatus:
    for kind, status in _STATUS_OF:
        if isinstance(error, kind):
            return status
    return CallStatus.INTERNAL


def _field_of(error: jsonschema.ValidationError) -> str:
    """The argument a schema error is about: its path, or the property it names."""
    path = [str(p) for p in error.absolute_path]
    expected: Any = error.validator_value
    schema: Any = error.schema
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [p for p in expected if p not in error.instance]
        if missing:
            path.append(str(missing[0]))
    elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            path.append(str(extra[0]))
    return ".".join(path) if path else "arguments"


def _describe(error: jsonschema.ValidationError) -> str:
    """A short, safe description (never echoes long user input)."""
    messages = {
        "required": "is required",
        "additionalProperties": "is not a known argument",
        "type": f"must be of type {error.validator_value}",
        "pattern": f"must match {error.validator_value}",
        "minLength": f"must be at least {error.validator_value} characters",
        "maxLength": f"must be at most {error.validator_value} characters",
        "minimum": f"must be >= {error.validator_value}",
        "maximum": f"must be <= {error.validator_value}",
        "exclusiveMinimum": f"must be > {error.validator_value}",
        "minProperties": f"needs at least {error.validator_value} arguments",
        "maxProperties": f"takes at most {error.validator_value} arguments",
        "enum": f"must be one of {error.validator_value}",
    }
    return messages.get(str(error.validator), "is invalid")
