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
    Principal,
    TokenCount,
    ToolCall,
    ToolCallsChosen,
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
        ("customer_id",),
        True,
    ),
    ToolDef(
        "billing_lookup",
        "Billing state of a customer.",
        _schema(
            {"customer_id": {"type": "string"}, "invoice_id": {"type": "string"}},
            ["customer_id"],
        ),
        Effect.READ,
        2000,
        ("customer_id",),
        True,
    ),
    ToolDef(
        "billing_refund",
        "WRITE: refund an invoice.",
        _schema(
            {
                "customer_id": {"type": "string"},
                "invoice_id": {"type": "string"},
                "amount": {"type": "number"},
                "reason": {"type": "string"},
            },
            ["customer_id", "invoice_id", "amount"],
        ),
        Effect.WRITE,
        5000,
        ("customer_id",),
        True,
    ),
    ToolDef(
        "crm_lookup",
        "Look up a customer.",
        _schema({"customer_id": {"type": "string"}}, ["customer_id"]),
        Effect.READ,
        2000,
        ("customer_id",),
        True,
    ),
    ToolDef(
        "kb_search",
        "Search the knowledge base.",
        _schema({"query": {"type": "string"}}, ["query"]),
        Effect.READ,
        3000,
    ),
)

# What "the model" writes: principal arguments are never generated (the schema it decodes
# has none), so none appear here.
DEFAULT_ARGS: dict[str, dict[str, Any]] = {
    "crm_lookup": {},
    "billing_lookup": {},
    "kb_search": {"query": "double charge"},
    "billing_refund": {"invoice_id": "INV-00012", "amount": 49, "reason": "charged twice"},
    "billing_credit": {"amount": 10, "reason": "goodwill"},
}
# The billing records the fake tools service shows the write checks (INV-00012: 49.00 paid
# twice, nothing refunded yet: 98.00 refundable).
BILLING = {
    "customer_id": "CUST-0042",
    "currency": "USD",
    "credit_balance": 0.0,
    "invoices": [
        {
            "invoice_id": "INV-00012",
            "amount": 49.0,
            "currency": "USD",
            "refunded": 0.0,
            "payments": [
                {"amount": 49.0, "status": "succeeded"},
                {"amount": 49.0, "status": "succeeded"},
            ],
        },
        {
            "invoice_id": "INV-00011",
            "amount": 49.0,
            "currency": "USD",
            "refunded": 49.0,
            "payments": [{"amount": 49.0, "status": "succeeded"}],
        },
    ],
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
# (answer number, prompt, tool choice) -> calls to open another round with, or None to answer.
AnswerScript = Callable[[int, list[Message], str], list[EmittedCall] | None]


def tokens_of(text: str) -> int:
    """The fake lane's tokenizer: 4 characters a token."""
    return (len(text) + 3) // 4


def planned(*names: str) -> dict[str, Any]:
    return {"calls": [{"tool": n, "intent": f"for {n}"} for n in names]}


class FakeInference:
    """Plans from a script, emits calls from a script, composes a fixed answer."""

    def __init__(
        self,
        *,
        plan: PlanScript | None = None,
        args: ArgsScript | None = None,
        answer: str = "Here is what I found about your account.",
        continue_with: AnswerScript | None = None,
        max_model_len: int = 4096,
    ) -> None:
        self.plan_script: PlanScript = plan or (lambda i, m: {"calls": []})
        self.args_script: ArgsScript = args or self.default_args
        self.answer_text = answer
        self.continue_script: AnswerScript = continue_with or (lambda i, m, c: None)
        self.max_model_len = max_model_len
        self.fail_answer_after_first_delta: Exception | None = None
        self.calls: list[Recorded] = []
        self.tools_seen: list[tuple[str, tuple[ToolDef, ...]]] = []
        self.tool_choices: list[str] = []
        # Every prompt sent, in fake tokens, with the output it asked room for.
        self.prompt_sizes: list[tuple[str, int, int]] = []
        self.block_plan: asyncio.Event | None = None
        self.block_compose_after_first_delta: asyncio.Event | None = None
        self.compose_started = asyncio.Event()
        self.first_delta_sent = asyncio.Event()
        self.compose_aborted = False
        self.plan_aborted = False
        self._plans = 0
        self._emits = 0
        self._answers = 0

    def size(
        self, kind: str, messages: Sequence[Message], tools: Sequence[ToolDef], out: int
    ) -> None:
        tokens = sum(tokens_of(m.content) + 4 for m in messages) + sum(
            tokens_of(t.description + t.parameters_json_schema) + 8 for t in tools
        )
        self.prompt_sizes.append((kind, tokens, out))

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
        self.tools_seen.append(("plan", tuple(tools)))
        self.size("plan", messages, tools, max_tokens)
        self._plans += 1
        if self.block_plan is not None:
            try:
                await self.block_plan.wait()
            except asyncio.CancelledError:
                self.plan_aborted = True
                raise
        plan = {"reasoning": f"plan {self._plans}", **self.plan_script(self._plans, list(messages))}
        if "tools" in plan:  # shorthand: a list of names
            plan["calls"] = [{"tool": n, "intent": ""} for n in plan.pop("tools")]
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
        self.tools_seen.append(("emit", tuple(tools)))
        self.size("emit", messages, tools, max_tokens or 96)
        out = []
        for name in names:
            self._emits += 1
            out.append(self.args_script(name, lane, self._emits, list(messages)))
        return CallToolsResult(tuple(out), self.stats(lane, generations=len(names) + 1))

    async def answer(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        tool_choice: str,
        max_calls: int,
        max_tokens: int,
        timeout_s: float,
    ) -> AsyncGenerator[ComposeDelta | ToolCallsChosen | ComposeDone, None]:
        self.calls.append(Recorded("answer", lane, list(messages), timeout_s=timeout_s))
        self.tools_seen.append(("answer", tuple(tools)))
        self.tool_choices.append(tool_choice)
        self.size("answer", messages, tools, max_tokens)
        self._answers += 1
        self.compose_started.set()
        chosen = (
            None
            if tool_choice == "none"
            else self.continue_script(self._answers, list(messages), tool_choice)
        )
        try:
            if chosen:
                yield ToolCallsChosen(tuple(chosen[:max_calls]))
            else:
                for i, word in enumerate(self.answer_text.split(" ")):
                    yield ComposeDelta(word if i == 0 else " " + word)
                    self.first_delta_sent.set()
                    if i == 0 and self.fail_answer_after_first_delta is not None:
                        raise self.fail_answer_after_first_delta
                    if i == 0 and self.block_compose_after_first_delta is not None:
                        await self.block_compose_after_first_delta.wait()
                    await asyncio.sleep(0)
            yield ComposeDone(self.stats(lane))
        except (asyncio.CancelledError, GeneratorExit):
            self.compose_aborted = True
            raise

    async def count_tokens(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        texts: Sequence[str] = (),
        truncate_to: int = 0,
        timeout_s: float,
    ) -> TokenCount:
        self.calls.append(Recorded("count", lane, list(messages), timeout_s=timeout_s))
        per = tuple(tokens_of(m.content) for m in messages)
        framing = 4 * len(messages) + sum(
            tokens_of(t.description + t.parameters_json_schema) + 8 for t in tools
        )
        text_tokens = tuple(tokens_of(t) for t in texts)
        cuts = tuple(
            t[: truncate_to * 4] if truncate_to and tokens_of(t) > truncate_to else None
            for t in texts
        )
        return TokenCount(
            prompt_tokens=(sum(per) + framing) if messages else 0,
            max_model_len=self.max_model_len,
            message_tokens=per,
            text_tokens=text_tokens,
            truncated_texts=cuts,
        )

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
    principals: list[Principal] = field(default_factory=list)
    block: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    list_calls: int = 0

    async def list_tools(self, *, timeout_s: float) -> list[ToolDef]:
        self.list_calls += 1
        return list(self.registry)

    async def execute(
        self,
        invocations: Sequence[ToolInvocation],
        *,
        principal: Principal,
        timeout_s: float,
    ) -> list[ToolOutcome]:
        self.invocations.extend(invocations)
        self.principals.extend(principal for _ in invocations)
        self.started.set()

        async def one(inv: ToolInvocation) -> ToolOutcome:
            if self.block is not None:
                await self.block.wait()
            handler = self.handlers.get(inv.name)
            if handler is not None:
                return handler(inv)
            if inv.name == "billing_lookup":
                return ok_result(inv, BILLING)
            return ok_result(inv, {"tool": inv.name, "args": json.loads(inv.arguments_json)})

        try:
            return list(await asyncio.gather(*(one(i) for i in invocations)))
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def names(self) -> list[str]:
        """Tools the model's calls ran (the write checks' own reads left out)."""
        return [i.name for i in self.invocations if not i.call_id.startswith("check_")]

    def model_invocations(self) -> list[ToolInvocation]:
        return [i for i in self.invocations if not i.call_id.startswith("check_")]
