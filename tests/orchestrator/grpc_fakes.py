"""Fake downstream gRPC services (inference, tools) served through the real shared bootstrap,
so the orchestrator is tested over real channels with health, deadlines and cancellation.

The fake inference is "the model", scripted per stage:

- CountTokens: about 4 characters a token; ``max_model_len`` is settable; a text longer than
  ``truncate_texts_to`` tokens comes back cut to that many tokens x 4 characters.
- Generate (the plan): ``{"calls": [{"tool", "intent"}], "reasoning"}`` with the tools of
  ``plan_tools`` (or of ``plan_script(request)``), whether or not the request offered them
  (a model that ignores its grammar: the orchestrator must filter).
- CallTools: one call per requested name with ``arguments[name]`` (any arguments a test
  wants "the model" to write: another customer's id, a refund of someone else's invoice).
- StreamGenerate (continue or answer): with ``tool_choice`` MODE_AUTO / MODE_REQUIRED it
  pops the next batch of ``answer_calls`` and returns it as one ``tool_calls`` event; with
  no tool choice (or nothing queued) it streams ``answer`` as text.

The fake tools service mirrors the real registry (``services.tools.registry``) and records
every invocation with its ``agentmesh-principal`` metadata and idempotency key.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry

from services.tools.registry import default_registry
from services.tools.service import spec_to_pb
from shared.config import ServiceSettings
from shared.errors import ResourceExhausted
from shared.health import HealthReporter
from shared.server import GrpcServer

READS = ["crm_lookup", "kb_search", "billing_lookup"]
LADDER = ["workhorse", "planner", "heavy"]
PRINCIPAL_HEADER = "agentmesh-principal"
CHARS_PER_TOKEN = 4
# What "the model" writes by default, per tool (principal arguments left out, as the model
# sees the schemas; tests put them back in to play a model that invents ids).
DEFAULT_ARGS: dict[str, dict[str, Any]] = {
    "crm_lookup": {},
    "billing_lookup": {},
    "kb_search": {"query": "double charge"},
    "billing_refund": {"invoice_id": "INV-00012", "amount": 19.0, "reason": "charged twice"},
    "billing_credit": {"amount": 10.0, "reason": "goodwill credit"},
}
# The fake billing record of every customer: one invoice, charged twice.
FAKE_INVOICE = "INV-00012"


def _ms(ms: int) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromMilliseconds(ms)
    return value


def tokens(text: str) -> int:
    """The fake tokenizer: about four characters a token."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Seen:
    """One request the fake inference served."""

    kind: str  # "count_tokens" | "plan" | "call_tools" | "answer"
    request: Any
    time_remaining: float | None


class FakeInferenceServicer(inference_pb2_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """A scripted model; see the module docstring."""

    def __init__(self, answer: str = "Your invoice INV-00012 was charged twice.") -> None:
        self.answer = answer
        self.max_model_len = 8192
        self.plan_tools: list[str] = list(READS)
        self.plan_script: Callable[[inference_pb2.GenerateRequest], Sequence[str]] | None = None
        self.arguments: dict[str, dict[str, Any]] = {k: dict(v) for k, v in DEFAULT_ARGS.items()}
        # Each continue-or-answer generation allowed to call tools takes the next batch.
        self.answer_calls: list[list[tuple[str, dict[str, Any]]]] = []
        self.seen: list[Seen] = []
        # Blocks the answer stream after its first delta (only a cancel ends it if never set).
        self.compose_gate: asyncio.Event | None = None
        self.compose_started = asyncio.Event()
        self.compose_cancelled = asyncio.Event()
        # Blocks the observation count (CountTokens with texts: after a tool ran).
        self.observe_gate: asyncio.Event | None = None
        self.observe_started = asyncio.Event()
        self.observe_cancelled = asyncio.Event()
        # CallTools answers RESOURCE_EXHAUSTED (a full lane, with a retry hint) this many times.
        self.full_lane_refusals = 0
        # StreamGenerate does the same, before its first message, this many times.
        self.full_stream_refusals = 0

    # ------------------------------------------------------------------ helpers

    def _lane(self, selector: inference_pb2.LaneSelector) -> inference_pb2.LaneChoice:
        name = selector.lane or LADDER[min(selector.escalation_level, 2)]
        return inference_pb2.LaneChoice(lane=name, model="fake-135m", reason="fake")

    def _record(self, kind: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.seen.append(Seen(kind, request, context.time_remaining()))

    def kinds(self) -> list[str]:
        return [s.kind for s in self.seen]

    def of_kind(self, kind: str) -> list[Any]:
        return [s.request for s in self.seen if s.kind == kind]

    @property
    def requests(self) -> list[tuple[str, Any, float | None]]:
        return [(s.kind, s.request, s.time_remaining) for s in self.seen]

    # ------------------------------------------------------------------ RPCs

    async def CountTokens(
        self,
        request: inference_pb2.CountTokensRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> inference_pb2.CountTokensResponse:
        self._record("count_tokens", request, context)
        if request.texts and not request.messages and self.observe_gate is not None:
            self.observe_started.set()
            try:
                await self.observe_gate.wait()
            except asyncio.CancelledError:
                self.observe_cancelled.set()
                raise
        per_message = [tokens(m.content) for m in request.messages]
        tool_tokens = sum(
            tokens(t.name + t.description + t.parameters_json_schema) for t in request.tools
        )
        prompt = sum(per_message) + 4 * len(per_message) + tool_tokens if per_message else 0
        limit = request.truncate_texts_to
        texts = []
        for text in request.texts:
            count = tokens(text)
            if limit and count > limit:
                texts.append(
                    inference_pb2.TextTokens(
                        tokens=count, truncated_text=text[: limit * CHARS_PER_TOKEN], truncated=True
                    )
                )
            else:
                texts.append(inference_pb2.TextTokens(tokens=count))
        return inference_pb2.CountTokensResponse(
            prompt_tokens=prompt,
            max_model_len=self.max_model_len,
            lane=self._lane(request.lane),
            message_tokens=per_message,
            texts=texts,
        )

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.GenerateResponse:
        self._record("plan", request, context)
        names = list(self.plan_script(request) if self.plan_script else self.plan_tools)
        plan = {
            "calls": [{"tool": n, "intent": f"look up {n}"} for n in names],
            "reasoning": "look it up",
        }
        return inference_pb2.GenerateResponse(
            text=json.dumps(plan),
            usage=common_pb2.Usage(
                prompt_tokens=300, completion_tokens=20, cached_prompt_tokens=250
            ),
            finish_reason=inference_pb2.FINISH_REASON_STOP,
            lane=self._lane(request.lane),
            time_to_first_token=_ms(5),
            elapsed=_ms(10),
        )

    async def CallTools(
        self, request: inference_pb2.CallToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.CallToolsResponse:
        self._record("call_tools", request, context)
        if self.full_lane_refusals > 0:
            self.full_lane_refusals -= 1
            raise ResourceExhausted("lane workhorse is at capacity", retry_after_s=0.05)
        calls = [
            self._emitted(f"call_{i}", name, self.arguments.get(name, {}))
            for i, name in enumerate(request.tool_choice.names)
        ]
        return inference_pb2.CallToolsResponse(
            calls=calls,
            usage=common_pb2.Usage(prompt_tokens=900, completion_tokens=60),
            lane=self._lane(request.lane),
            generations=len(calls) + 1,
            elapsed=_ms(10),
        )

    @staticmethod
    def _emitted(call_id: str, name: str, args: dict[str, Any]) -> inference_pb2.EmittedToolCall:
        arguments = json.dumps(args)
        return inference_pb2.EmittedToolCall(
            call=common_pb2.ToolCall(id=call_id, name=name, arguments_json=arguments),
            outcome=inference_pb2.PARSE_OUTCOME_OK,
            raw_text=f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>',
        )

    async def StreamGenerate(
        self,
        request: inference_pb2.StreamGenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inference_pb2.StreamGenerateResponse]:
        self._record("answer", request, context)
        if self.full_stream_refusals > 0:
            self.full_stream_refusals -= 1
            raise ResourceExhausted("lane workhorse is at capacity", retry_after_s=0.05)
        self.compose_started.set()
        may_call = request.HasField("tool_choice") and request.tool_choice.mode in (
            inference_pb2.ToolChoice.MODE_AUTO,
            inference_pb2.ToolChoice.MODE_REQUIRED,
        )
        summary = inference_pb2.StreamGenerateResponse(
            summary=inference_pb2.GenerationSummary(
                usage=common_pb2.Usage(prompt_tokens=1200, completion_tokens=9),
                finish_reason=inference_pb2.FINISH_REASON_STOP,
                lane=self._lane(request.lane),
                time_to_first_token=_ms(7),
                elapsed=_ms(20),
            )
        )
        if may_call and self.answer_calls:
            batch = self.answer_calls.pop(0)[: max(1, request.max_calls)]
            yield inference_pb2.StreamGenerateResponse(
                tool_calls=inference_pb2.ToolCallsEmitted(
                    calls=[
                        self._emitted(f"auto_{i}", name, args)
                        for i, (name, args) in enumerate(batch)
                    ]
                )
            )
            yield summary
            return
        try:
            for i, word in enumerate(self.answer.split(" ")):
                yield inference_pb2.StreamGenerateResponse(
                    text_delta=word if i == 0 else " " + word
                )
                if i == 0 and self.compose_gate is not None:
                    await self.compose_gate.wait()
            yield summary
        except asyncio.CancelledError:
            self.compose_cancelled.set()
            raise

    async def ListLanes(
        self, request: inference_pb2.ListLanesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.ListLanesResponse:
        return inference_pb2.ListLanesResponse(preset="fake")


@dataclass(frozen=True)
class Executed:
    """One invocation the fake tools service received, with the principal it came under."""

    principal: str
    invocation: tools_pb2.ToolInvocation

    @property
    def name(self) -> str:
        return str(self.invocation.name)

    @property
    def args(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.invocation.arguments_json or "{}")
        return value


class FakeToolServicer(tools_pb2_grpc.ToolServiceServicer):  # type: ignore[misc]
    """The real registry; reads answer from fixed data, writes replay by idempotency key."""

    def __init__(self) -> None:
        self.registry = default_registry()
        self.executed: list[Executed] = []
        # Per ExecuteTools call: the agentmesh-principal value ("" when absent).
        self.principals: list[str] = []
        # A tool name -> the result body it returns instead of the default one.
        self.bodies: dict[str, str] = {}
        self._writes: dict[str, str] = {}

    @property
    def invocations(self) -> list[tools_pb2.ToolInvocation]:
        return [e.invocation for e in self.executed]

    def of_tool(self, name: str) -> list[Executed]:
        return [e for e in self.executed if e.name == name]

    async def ListTools(
        self, request: tools_pb2.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools_pb2.ListToolsResponse:
        return tools_pb2.ListToolsResponse(
            tools=spec_to_pb(self.registry), registry_version=self.registry.version
        )

    async def ExecuteTools(
        self, request: tools_pb2.ExecuteToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools_pb2.ExecuteToolsResponse:
        metadata = dict(context.invocation_metadata() or ())
        principal = str(metadata.get(PRINCIPAL_HEADER, ""))
        self.principals.append(principal)
        customer = principal.removeprefix("customer:") if principal.startswith("customer:") else ""
        results = []
        for inv in request.invocations:
            self.executed.append(Executed(principal, inv))
            status, body, replayed = self._run(inv, customer)
            results.append(
                tools_pb2.ToolResult(
                    call_id=inv.call_id,
                    name=inv.name,
                    status=status,
                    error_message="" if status == tools_pb2.TOOL_RESULT_STATUS_OK else "refused",
                    result_json=body,
                    fenced_result=f'<tool_result source="fake">{body}</tool_result>',
                    latency=_ms(3),
                    source="fake",
                    replayed=replayed,
                )
            )
        return tools_pb2.ExecuteToolsResponse(results=results)

    def _run(self, inv: tools_pb2.ToolInvocation, customer: str) -> tuple[Any, str, bool]:
        """(ToolResultStatus, result JSON, replayed)."""
        tool = self.registry.get(inv.name)
        if tool is None:
            return tools_pb2.TOOL_RESULT_STATUS_NOT_FOUND, "", False
        if tool.requires_customer and not customer:
            return tools_pb2.TOOL_RESULT_STATUS_PERMISSION_DENIED, "", False
        args = json.loads(inv.arguments_json or "{}")
        if inv.name in self.bodies:
            return tools_pb2.TOOL_RESULT_STATUS_OK, self.bodies[inv.name], False
        if inv.name == "billing_lookup":
            if args.get("invoice_id") not in (None, FAKE_INVOICE):
                return tools_pb2.TOOL_RESULT_STATUS_NOT_FOUND, "", False
            return tools_pb2.TOOL_RESULT_STATUS_OK, json.dumps(fake_billing(customer)), False
        if tool.effect.value == "write":
            if not inv.idempotency_key:
                return tools_pb2.TOOL_RESULT_STATUS_INVALID_ARGUMENT, "", False
            if inv.idempotency_key in self._writes:
                return tools_pb2.TOOL_RESULT_STATUS_OK, self._writes[inv.idempotency_key], True
            body = json.dumps({"tool": inv.name, "done": True, **args})
            self._writes[inv.idempotency_key] = body
            return tools_pb2.TOOL_RESULT_STATUS_OK, body, False
        return tools_pb2.TOOL_RESULT_STATUS_OK, json.dumps({"tool": inv.name, **args}), False


def fake_billing(customer_id: str) -> dict[str, Any]:
    """The fake billing record: FAKE_INVOICE (19.00 USD) charged twice."""
    paid = [{"amount": 19.0, "status": "succeeded"}, {"amount": 19.0, "status": "succeeded"}]
    return {
        "customer_id": customer_id,
        "currency": "USD",
        "credit_balance": 0.0,
        "invoices": [
            {
                "invoice_id": FAKE_INVOICE,
                "amount": 19.0,
                "currency": "USD",
                "status": "paid",
                "refunded": 0.0,
                "double_charged": True,
                "payments": paid,
            }
        ],
    }


@dataclass
class FakeService:
    """A shared.server Service around one fake servicer."""

    name: str
    service_names: Sequence[str]
    servicer: Any
    adder: Any
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def register(self, server: grpc.aio.Server) -> None:
        self.adder(self.servicer, server)

    async def warm_up(self, health: HealthReporter) -> None:
        return None

    async def close(self) -> None:
        return None


async def serve(service: Any) -> GrpcServer:
    """A real server for ``service`` on 127.0.0.1 port 0, SERVING when returned."""
    server = GrpcServer(service, ServiceSettings(port=0, metrics_port=0, grace_seconds=1))
    await server.start()
    await server.wait_until_serving(10)
    return server


async def start_fake_inference() -> tuple[GrpcServer, FakeInferenceServicer]:
    servicer = FakeInferenceServicer()
    service = FakeService(
        "inference",
        ["agentmesh.inference.v1.InferenceService"],
        servicer,
        inference_pb2_grpc.add_InferenceServiceServicer_to_server,
    )
    return await serve(service), servicer


async def start_fake_tools() -> tuple[GrpcServer, FakeToolServicer]:
    servicer = FakeToolServicer()
    service = FakeService(
        "tools",
        ["agentmesh.tools.v1.ToolService"],
        servicer,
        tools_pb2_grpc.add_ToolServiceServicer_to_server,
    )
    return await serve(service), servicer


async def start_fake(kind: str) -> tuple[GrpcServer, Any]:
    if kind == "inference":
        return await start_fake_inference()
    return await start_fake_tools()
