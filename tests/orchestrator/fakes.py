"""In-process fakes of the orchestrator's ports (scripted, recording; not mocks)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.orchestrator.loop.types import (
    CallToolsResult,
    ComposeDelta,
    ComposeDone,
    Decoding,
    Effect,
    EmittedCall,
    GenerateResult,
    GenerationStats,
    LaneRequest,
    Message,
    ToolCall,
    ToolDef,
    ToolInvocation,
    ToolOutcome,
    Usage,
)

LADDER = ["workhorse", "planner", "heavy"]


def _schema(props: dict[str, Any], required: list[str]) -> str:
    return json.dumps(
        {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    )


REGISTRY: tuple[ToolDef, ...] = (
    ToolDef(
        "billing_credit",
        "WRITE: add account credit.",
        _schema(
            {"customer_id": {"type": "string"}, "amount": {"type": "number"}},
            ["customer_id", "amount"],
        ),
        Effect.WRITE,
        5000,
    ),
    ToolDef(
        "billing_lookup",
        "Billing state of a customer.",
        _schema({"customer_id": {"type": "string"}}, ["customer_id"]),
        Effect.READ,
        2000,
    ),
    ToolDef(
        "billing_refund",
        "WRITE: refund an invoice.",
        _schema(
            {"invoice_id": {"type": "string"}, "amount": {"type": "number"}},
            ["invoice_id", "amount"],
        ),
        Effect.WRITE,
        5000,
    ),
    ToolDef(
        "crm_lookup",
        "Look up a customer.",
        _schema({"customer_id": {"type": "string"}}, ["customer_id"]),
        Effect.READ,
        2000,
    ),
    ToolDef(
        "kb_search",
        "Search the knowledge base.",
        _schema({"query": {"type": "string"}}, ["query"]),
        Effect.READ,
        3000,
    ),
)

DEFAULT_ARGS: dict[str, dict[str, Any]] = {
    "crm_lookup": {"customer_id": "CUST-0042"},
    "billing_lookup": {"customer_id": "CUST-0042"},
    "kb_search": {"query": "double charge"},
    "billing_refund": {"invoice_id": "INV-00012", "amount": 500},
    "billing_credit": {"customer_id": "CUST-0042", "amount": 10},
}


@dataclass
class Recorded:
    kind: str
    lane: LaneRequest
    messages: list[Message]
    names: tuple[str, ...] = ()
    decoding: Decoding | None = None
    timeout_s: float = 0.0


PlanScript = Callable[[int, list[Message]], dict[str, Any]]
ArgsScript = Callable[[str, LaneRequest, int, list[Message]], EmittedCall]


class FakeInference:
    """Plans from a script, emits calls from a script, composes a fixed answer."""

    def __init__(
        self,
        *,
        plan: PlanScript | None = None,
        args: ArgsScript | None = None,
        answer: str = "Here is what I found about your account.",
    ) -> None:
        self.plan_script: PlanScript = plan or (lambda i, m: {"tools": [], "done": True})
        self.args_script: ArgsScript = args or self.default_args
        self.answer = answer
        self.calls: list[Recorded] = []
        self.block_plan: asyncio.Event | None = None
        self.block_compose_after_first_delta: asyncio.Event | None = None
        self.compose_started = asyncio.Event()
        self.first_delta_sent = asyncio.Event()
        self.compose_aborted = False
        self.plan_aborted = False
        self._plans = 0
        self._emits = 0

    @staticmethod
    def default_args(name: str, lane: LaneRequest, n: int, messages: list[Message]) -> EmittedCall:
        return EmittedCall(ToolCall(f"c{n}", name, json.dumps(DEFAULT_ARGS.get(name, {}))), ok=True)

    def stats(self, lane: LaneRequest, generations: int = 1) -> GenerationStats:
        name = lane.lane or LADDER[min(lane.escalation_level, 2)]
        return GenerationStats(
            lane=name,
            model="fake-model",
            usage=Usage(prompt_tokens=100, completion_tokens=10, cached_prompt_tokens=80),
            ttft_s=0.001,
            elapsed_s=0.0,
            generations=generations,
            finish_reason="STOP",
        )

    async def plan(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        json_schema: str,
        max_tokens: int,
        timeout_s: float,
    ) -> GenerateResult:
        self.calls.append(Recorded("plan", lane, list(messages), timeout_s=timeout_s))
        self._plans += 1
        if self.block_plan is not None:
            try:
                await self.block_plan.wait()
            except asyncio.CancelledError:
                self.plan_aborted = True
                raise
        plan = {"reasoning": f"plan {self._plans}", **self.plan_script(self._plans, list(messages))}
        return GenerateResult(json.dumps(plan), self.stats(lane))

    async def emit_tool_calls(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        names: Sequence[str],
        lane: LaneRequest,
        *,
        parallel: bool,
        decoding: Decoding,
        max_tokens: int | None,
        timeout_s: float,
    ) -> CallToolsResult:
        self.calls.append(Recorded("emit", lane, list(messages), tuple(names), decoding, timeout_s))
        out = []
        for name in names:
            self._emits += 1
            out.append(self.args_script(name, lane, self._emits, list(messages)))
        return CallToolsResult(tuple(out), self.stats(lane, generations=len(names) + 1))

    async def compose(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        max_tokens: int,
        timeout_s: float,
    ) -> AsyncGenerator[ComposeDelta | ComposeDone, None]:
        self.calls.append(Recorded("compose", lane, list(messages), timeout_s=timeout_s))
        self.compose_started.set()
        try:
            for i, word in enumerate(self.answer.split(" ")):
                yield ComposeDelta(word if i == 0 else " " + word)
                self.first_delta_sent.set()
                if i == 0 and self.block_compose_after_first_delta is not None:
                    await self.block_compose_after_first_delta.wait()
                await asyncio.sleep(0)
            yield ComposeDone(self.stats(lane))
        except (asyncio.CancelledError, GeneratorExit):
            self.compose_aborted = True
            raise

    def of_kind(self, kind: str) -> list[Recorded]:
        return [c for c in self.calls if c.kind == kind]


ToolHandler = Callable[[ToolInvocation], ToolOutcome]


def ok_result(inv: ToolInvocation, data: Any) -> ToolOutcome:
    body = json.dumps(data)
    return ToolOutcome(
        call_id=inv.call_id,
        name=inv.name,
        status="OK",
        result_json=body,
        fenced_result=f'<tool_result source="fake:{inv.name}">\n{body}\n</tool_result>',
        latency_s=0.001,
        source=f"fake:{inv.name}",
    )


@dataclass
class FakeTools:
    """Runs invocations through per-tool handlers, concurrently; records everything."""

    registry: tuple[ToolDef, ...] = REGISTRY
    handlers: dict[str, ToolHandler] = field(default_factory=dict)
    invocations: list[ToolInvocation] = field(default_factory=list)
    block: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    list_calls: int = 0

    async def list_tools(self, *, timeout_s: float) -> list[ToolDef]:
        self.list_calls += 1
        return list(self.registry)

    async def execute(
        self, invocations: Sequence[ToolInvocation], *, timeout_s: float
    ) -> list[ToolOutcome]:
        self.invocations.extend(invocations)
        self.started.set()

        async def one(inv: ToolInvocation) -> ToolOutcome:
            if self.block is not None:
                await self.block.wait()
            handler = self.handlers.get(inv.name)
            if handler is not None:
                return handler(inv)
            return ok_result(inv, {"tool": inv.name, "args": json.loads(inv.arguments_json)})

        try:
            return list(await asyncio.gather(*(one(i) for i in invocations)))
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def names(self) -> list[str]:
        return [i.name for i in self.invocations]
