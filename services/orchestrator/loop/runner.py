"""One agent turn: plan -> emit tool calls in parallel -> execute concurrently -> observe ->
(another round while within caps) -> streamed compose.

The runner holds no gRPC and no storage: it reads a TurnInput, talks through the ports, and
yields domain events. Every downstream call gets the time left in the turn (turn budget ∩ task
budget ∩ the caller's RPC deadline, minus a margin) as its timeout, so nothing outlives the
turn; cancelling the consuming task cancels the in-flight downstream call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from services.orchestrator.loop import prompts
from services.orchestrator.loop.events import (
    ComposeText,
    Escalated,
    EscalationKind,
    LaneUsage,
    Latency,
    MessagesCommitted,
    Outcome,
    PlanMade,
    ToolCallFinished,
    ToolCallStarted,
    TurnCompleted,
    TurnEvent,
    TurnStarted,
)
from services.orchestrator.loop.policy import AgentProfile, Caps
from services.orchestrator.loop.ports import InferencePort, ToolsPort
from services.orchestrator.loop.safety import WriteIntentPolicy, idempotency_key
from services.orchestrator.loop.types import (
    ComposeDone,
    Effect,
    EmittedCall,
    GenerateResult,
    GenerationStats,
    LaneRequest,
    Message,
    Role,
    ToolCall,
    ToolDef,
    ToolInvocation,
    ToolOutcome,
    canonical_args,
)
from shared.deadlines import Deadline
from shared.errors import AgentmeshError, DeadlineExceeded

REFUSED = "REFUSED"
SKIPPED_DUPLICATE = "SKIPPED_DUPLICATE"
SKIPPED_CAP = "SKIPPED_CAP"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
T = TypeVar("T")
REFUSAL_TEXT = "write action refused: the user did not ask for it in this conversation"
TRUNCATION_MARKER = "\n[... truncated by the orchestrator ...]"


@dataclass(frozen=True)
class TurnInput:
    session_id: str
    turn_index: int
    history: tuple[Message, ...]
    user_message: str
    registry: tuple[ToolDef, ...]
    caps: Caps
    customer_id: str = ""
    task_tool_calls: int = 0
    task_time_used_s: float = 0.0
    # Forces one lane for every stage; empty: automatic selection and escalation.
    forced_lane: str = ""
    # The caller's RPC deadline, if any.
    deadline: Deadline | None = None

    @property
    def turn_id(self) -> str:
        return f"{self.session_id}-t{self.turn_index}"


@dataclass
class _Turn:
    """Mutable state of one running turn."""

    inp: TurnInput
    turn_deadline: Deadline
    tools_deadline: Deadline
    messages: list[Message]
    tools: dict[str, ToolDef]
    user_texts: list[str]
    calls: int = 0
    call_seq: int = 0
    seen: set[tuple[str, str]] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    exhausted: bool = False
    # A write the user did not ask for was declined: the answer must say so.
    refused: bool = False
    failed: bool = False
    tool_level: int = 0
    lane_escalations: int = 0
    usage: dict[str, LaneUsage] = field(default_factory=dict)
    latency: Latency = field(default_factory=Latency)

    @property
    def task_calls(self) -> int:
        return self.inp.task_tool_calls + self.calls

    def calls_left(self) -> int:
        caps = self.inp.caps
        return max(
            0,
            min(
                caps.max_tool_calls_per_turn - self.calls,
                caps.max_tool_calls_per_task - self.task_calls,
            ),
        )

    def cap_note(self) -> str:
        caps = self.inp.caps
        if self.task_calls >= caps.max_tool_calls_per_task or (
            caps.max_tool_calls_per_task - self.task_calls
            < caps.max_tool_calls_per_turn - self.calls
        ):
            return f"the task's tool-call cap ({caps.max_tool_calls_per_task}) was reached"
        return f"the turn's tool-call cap ({caps.max_tool_calls_per_turn}) was reached"

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def refuse(self, name: str) -> None:
        self.refused = True
        self.note(f"{name} was refused: the user did not ask for that action")


class TurnRunner:
    """Runs turns through the ports under an agent profile."""

    def __init__(
        self,
        inference: InferencePort,
        tools: ToolsPort,
        profile: AgentProfile,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inference = inference
        self._tools = tools
        self._profile = profile
        self._intent = WriteIntentPolicy(profile.write_intent_keywords)
        self._clock = clock

    # ------------------------------------------------------------------ the turn

    async def run(self, inp: TurnInput) -> AsyncGenerator[TurnEvent, None]:
        started = self._clock()
        profile = self._profile
        caps = inp.caps
        task_left = max(0.0, caps.task_budget_s - inp.task_time_used_s)
        turn_deadline = Deadline.after(min(caps.turn_budget_s, task_left)).earliest(inp.deadline)
        tools_deadline = Deadline(turn_deadline.expires_at - profile.compose_reserve_s)
        user_msg = Message(Role.USER, inp.user_message)
        base: list[Message] = [Message(Role.SYSTEM, profile.system_prompt)]
        context = prompts.customer_context(inp.customer_id)
        if context is not None:
            base.append(context)
        turn = _Turn(
            inp=inp,
            turn_deadline=turn_deadline,
            tools_deadline=tools_deadline,
            messages=[*base, *self._history(inp.history), user_msg],
            tools={t.name: t for t in inp.registry},
            user_texts=[m.content for m in inp.history if m.role is Role.USER] + [inp.user_message],
        )
        yield TurnStarted(turn_id=inp.turn_id, turn_index=inp.turn_index)
        yield MessagesCommitted((user_msg,))
        if task_left <= 0:
            turn.exhausted = True
            turn.note(f"the task's time budget ({caps.task_budget_s:g} s) is used up")

        async for event in self._tool_rounds(turn):
            yield event
        async for event in self._compose(turn):
            yield event

        turn.latency.total = self._clock() - started
        if turn.failed:
            outcome = Outcome.FAILED
        elif turn.exhausted:
            outcome = Outcome.BUDGET_EXHAUSTED
        else:
            outcome = Outcome.COMPLETED
        answer = turn.messages[-1].content if turn.messages[-1].role is Role.ASSISTANT else ""
        yield TurnCompleted(
            turn_id=inp.turn_id,
            answer=answer,
            outcome=outcome,
            usage=tuple(turn.usage.values()),
            latency=turn.latency,
            tool_calls=turn.calls,
            task_tool_calls=turn.task_calls,
            notes=tuple(turn.notes),
        )

    def _history(self, history: Sequence[Message]) -> list[Message]:
        """Earlier turns as the prompt sees them: without old tool traffic (unless kept) and
        cut from the oldest end to the character budget, so prompts fit the lane's context."""
        profile = self._profile
        kept = [
            m
            for m in history
            if profile.keep_past_tool_results or (m.role is not Role.TOOL and not m.tool_calls)
        ]
        total = 0
        start = len(kept)
        for i in range(len(kept) - 1, -1, -1):
            total += len(kept[i].content) + sum(len(c.arguments_json) for c in kept[i].tool_calls)
            if total > profile.history_max_chars:
                break
            start = i
        kept = kept[start:]
        while kept and kept[0].role is Role.TOOL:  # never start with orphaned tool results
            kept.pop(0)
        return kept

    # ------------------------------------------------------------------ rounds

    async def _tool_rounds(self, turn: _Turn) -> AsyncIterator[TurnEvent]:
        profile = self._profile
        caps = turn.inp.caps
        names = list(turn.tools)
        if not names:
            turn.note("no tools were available")
            return
        if turn.exhausted:
            return
        last_done = True
        for round_no in range(1, caps.max_rounds_per_turn + 1):
            left = turn.calls_left()
            if left == 0:
                turn.exhausted = True
                turn.note(turn.cap_note())
                return
            needed = profile.min_round_s + profile.deadline_margin_s
            if turn.tools_deadline.time_remaining() < needed:
                turn.exhausted = True
                turn.note("the turn's time budget ran out before more tools could run")
                return

            result: GenerateResult | None = None
            t0 = self._clock()
            try:
                messages = [*turn.messages, prompts.plan_instruction(names, left, round_no)]
                result = await self._bounded(
                    self._inference.plan(
                        messages,
                        turn.inp.registry,
                        self._lane("plan", 0, turn),
                        json_schema=prompts.plan_schema(names, left),
                        max_tokens=profile.plan_max_tokens,
                        timeout_s=self._timeout(turn.tools_deadline),
                    ),
                    turn.tools_deadline,
                )
                plan = prompts.parse_plan(result.text, names)
                self._account(turn, result.stats, self._clock() - t0, stage="plan")
            except DeadlineExceeded:
                turn.latency.plan += self._clock() - t0
                turn.exhausted = True
                turn.note("the turn's time budget ran out while planning")
                return
            except AgentmeshError as exc:
                turn.latency.plan += self._clock() - t0
                turn.note(f"planning failed ({exc.code.name.lower()})")
                if round_no > 1 or profile.min_tools_first_round == 0:
                    return
                plan = prompts.ParsedPlan(tools=(), done=False, reasoning="", parsed=False)

            chosen = self._choose(plan.tools, plan.done, round_no, turn)
            last_done = plan.done and not profile.always_use_tools
            if len(chosen) > left:
                turn.exhausted = True
                turn.note(turn.cap_note())
                chosen = chosen[:left]
            yield PlanMade(
                text=plan.reasoning,
                chosen_tools=tuple(chosen),
                lane=result.stats.lane if result is not None else "",
                round=round_no,
            )
            if not chosen:
                return

            ran_before = turn.calls
            async for event in self._tool_round(turn, chosen, round_no):
                yield event
            if turn.calls == ran_before:
                # Nothing new ran (all repeated, refused or invalid): another round won't help.
                return
            if turn.exhausted:
                return
        if not last_done and caps.max_rounds_per_turn > 1:
            # Having seen results, the model still wanted more: say the cap stopped it.
            turn.exhausted = True
            turn.note(f"stopped after {caps.max_rounds_per_turn} tool rounds (the turn's cap)")

    def _choose(self, planned: Sequence[str], done: bool, round_no: int, turn: _Turn) -> list[str]:
        profile = self._profile
        required = profile.required_first_round_tools if round_no == 1 else []
        chosen = [n for n in dict.fromkeys([*required, *planned]) if n in turn.tools]
        # "done" ends the tool loop; only the first round's policy minimum still applies.
        if (
            done
            and not profile.always_use_tools
            and (round_no > 1 or (profile.min_tools_first_round == 0 and not required))
        ):
            return []
        want = 0
        if round_no == 1:
            want = profile.min_tools_first_round
        if profile.always_use_tools:
            want = max(profile.min_tools_first_round, 1)
        if len(chosen) < want:
            order = profile.preferred_tools or [
                t.name for t in turn.inp.registry if t.effect is Effect.READ
            ]
            for name in order:
                if len(chosen) >= want:
                    break
                if name in turn.tools and name not in chosen:
                    chosen.append(name)
        return chosen

    # ------------------------------------------------------------------ one round

    async def _tool_round(
        self, turn: _Turn, names: list[str], round_no: int
    ) -> AsyncIterator[TurnEvent]:
        """Emit -> execute -> observe, walking the failure ladder for invalid calls:
        re-prompt once with the schema, then escalate one lane."""
        profile = self._profile
        # The write gate runs before any argument is generated: a write the user did not ask
        # for is refused whatever its arguments would have been (checked again after emission).
        pending = []
        for name in names:
            if self._write_not_asked_for(turn, turn.tools[name]):
                turn.refuse(name)
                yield ToolCallFinished("", name, "", REFUSED, 0.0, False, REFUSAL_TEXT, round_no)
            else:
                pending.append(name)
        feedback: dict[str, str] = {}
        reprompted = False
        while pending:
            level = turn.tool_level
            lane_name = turn.inp.forced_lane or profile.lane_name(level)
            override = profile.override_for(lane_name)
            messages = [
                *turn.messages,
                prompts.tool_call_instruction(pending, turn.inp.customer_id),
            ]
            if feedback:
                messages.append(prompts.reprompt_with_schema(feedback, turn.tools))
            t0 = self._clock()
            try:
                emitted = await self._bounded(
                    self._inference.emit_tool_calls(
                        messages,
                        turn.inp.registry,
                        pending,
                        self._lane("tool_call", level, turn),
                        parallel=profile.parallel_tool_calls,
                        decoding=override.tool_decoding,
                        max_tokens=override.tool_call_max_tokens or profile.tool_call_max_tokens,
                        timeout_s=self._timeout(turn.tools_deadline),
                    ),
                    turn.tools_deadline,
                )
            except DeadlineExceeded:
                turn.latency.tool_emit += self._clock() - t0
                turn.exhausted = True
                turn.note("the turn's time budget ran out while emitting tool calls")
                return
            except AgentmeshError as exc:
                turn.latency.tool_emit += self._clock() - t0
                turn.note(f"tool calls could not be emitted ({exc.code.name.lower()})")
                return
            self._account(turn, emitted.stats, self._clock() - t0, stage="tool_emit")

            failed: dict[str, str] = {}
            good: list[EmittedCall] = []
            by_name: dict[str, EmittedCall] = {}
            for call in emitted.calls:
                if call.call.name in pending and call.call.name not in by_name:
                    by_name[call.call.name] = call
            for name in pending:
                got = by_name.get(name)
                if got is None:
                    failed[name] = "no call was emitted"
                elif not got.ok:
                    failed[name] = got.parse_error or "the call did not parse"
                else:
                    good.append(got)

            invalid: dict[str, str] = {}
            if good:
                async for event in self._execute(turn, [c.call for c in good], round_no, invalid):
                    yield event
            failed.update(invalid)
            if not failed or turn.exhausted:
                return

            reason = "; ".join(f"{n}: {r}" for n, r in failed.items())
            if not reprompted:
                reprompted = True
                yield Escalated(EscalationKind.REPROMPT_WITH_SCHEMA, lane_name, lane_name, reason)
            elif (
                not turn.inp.forced_lane
                and turn.lane_escalations < profile.max_lane_escalations
                and level + 1 < max(1, len(profile.lane_ladder))
            ):
                turn.lane_escalations += 1
                turn.tool_level = level + 1
                yield Escalated(
                    EscalationKind.LANE_ESCALATION,
                    lane_name,
                    profile.lane_name(level + 1),
                    reason,
                )
            else:
                for name, why in failed.items():
                    turn.note(f"{name} could not be called with valid arguments")
                    if name not in invalid:
                        yield ToolCallFinished(
                            call_id="",
                            name=name,
                            arguments_json="",
                            status=INVALID_ARGUMENT,
                            latency_s=0.0,
                            truncated=False,
                            error_message=why,
                            round=round_no,
                        )
                return
            feedback = failed
            pending = list(failed)

    async def _execute(
        self,
        turn: _Turn,
        calls: list[ToolCall],
        round_no: int,
        invalid: dict[str, str],
    ) -> AsyncIterator[TurnEvent]:
        """Duplicate stop, write-intent gate and caps, then one concurrent batch; failures
        become observations, never a failed turn."""
        inp = turn.inp
        to_run: list[tuple[ToolCall, ToolInvocation]] = []
        declined: dict[str, tuple[str, str]] = {}
        recorded: list[ToolCall] = []
        for raw in calls:
            turn.call_seq += 1
            call = ToolCall(
                id=f"call_{inp.turn_index}_{round_no}_{turn.call_seq}",
                name=raw.name,
                arguments_json=canonical_args(raw.arguments_json),
            )
            tool = turn.tools[call.name]
            signature = (call.name, call.arguments_json)
            if signature in turn.seen:
                declined[call.id] = (SKIPPED_DUPLICATE, "identical call already made this turn")
                turn.note(f"a repeated {call.name} call with the same arguments was stopped")
            elif len(to_run) >= turn.calls_left():
                declined[call.id] = (SKIPPED_CAP, turn.cap_note())
                turn.exhausted = True
                turn.note(turn.cap_note())
            elif self._write_not_asked_for(turn, tool):
                declined[call.id] = (REFUSED, REFUSAL_TEXT)
                turn.refuse(call.name)
            else:
                key = (
                    idempotency_key(inp.session_id, inp.turn_index, call.name, call.arguments_json)
                    if tool.effect is Effect.WRITE
                    else ""
                )
                to_run.append(
                    (
                        call,
                        ToolInvocation(
                            call_id=call.id,
                            name=call.name,
                            arguments_json=call.arguments_json,
                            idempotency_key=key,
                            timeout_ms=tool.timeout_ms,
                        ),
                    )
                )
            turn.seen.add(signature)
            recorded.append(call)

        for call, _ in to_run:
            yield ToolCallStarted(call.id, call.name, call.arguments_json, round_no)

        outcomes: dict[str, ToolOutcome] = {}
        if to_run:
            t0 = self._clock()
            try:
                results = await self._bounded(
                    self._tools.execute(
                        [inv for _, inv in to_run],
                        timeout_s=self._timeout(turn.tools_deadline),
                    ),
                    turn.tools_deadline,
                )
                outcomes = {r.call_id: r for r in results}
            except AgentmeshError as exc:
                status = exc.code.name
                if isinstance(exc, DeadlineExceeded):
                    turn.exhausted = True
                    turn.note("the turn's time budget ran out while tools ran")
                outcomes = {
                    call.id: ToolOutcome(
                        call.id, call.name, status, error_message="the tool service failed"
                    )
                    for call, _ in to_run
                }
            wall = self._clock() - t0
            turn.latency.tool_wall += wall
            server = max((o.latency_s for o in outcomes.values()), default=0.0)
            if server > 0:
                turn.latency.network += max(0.0, wall - server)
            turn.calls += len(to_run)

        t_obs = self._clock()
        finished: list[ToolCallFinished] = []
        tool_messages: list[Message] = []
        for call in recorded:
            if call.id in declined:
                status, why = declined[call.id]
                content = f"[{status}] {call.name}: {why}."
                finished.append(
                    ToolCallFinished(
                        call.id, call.name, call.arguments_json, status, 0.0, False, why, round_no
                    )
                )
            else:
                outcome = outcomes.get(call.id) or ToolOutcome(
                    call.id, call.name, "INTERNAL", error_message="no result was returned"
                )
                content, cut = self._observe(call, outcome)
                if outcome.status == INVALID_ARGUMENT:
                    invalid[call.name] = outcome.error_message or "arguments failed validation"
                elif not outcome.ok:
                    turn.note(f"{call.name} failed ({outcome.status.lower()})")
                finished.append(
                    ToolCallFinished(
                        call.id,
                        call.name,
                        call.arguments_json,
                        outcome.status,
                        outcome.latency_s,
                        outcome.truncated or cut,
                        outcome.error_message,
                        round_no,
                    )
                )
            tool_messages.append(Message(Role.TOOL, content, tool_call_id=call.id, name=call.name))
        assistant = Message(Role.ASSISTANT, "", tool_calls=tuple(recorded))
        turn.messages.extend([assistant, *tool_messages])
        turn.latency.observe += self._clock() - t_obs
        for event in finished:
            yield event
        yield MessagesCommitted((assistant, *tool_messages), tool_calls_executed=len(to_run))

    def _write_not_asked_for(self, turn: _Turn, tool: ToolDef) -> bool:
        """The write gate: only the user's own messages of this task can authorise a write."""
        return tool.effect is Effect.WRITE and not self._intent.user_asked_for(
            tool.name, turn.user_texts
        )

    def _observe(self, call: ToolCall, outcome: ToolOutcome) -> tuple[str, bool]:
        """The tool message the model reads: fenced data (the tools service's fence when it sent
        one), errors as data too, cut to the observation limit."""
        if outcome.ok:
            content = outcome.fenced_result or _fence(call.name, "OK", outcome.result_json)
        else:
            content = outcome.fenced_result or _fence(
                call.name, outcome.status, json.dumps({"error": outcome.error_message})
            )
        limit = self._profile.observe_max_chars
        if len(content) > limit:
            return content[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER, True
        return content, False

    # ------------------------------------------------------------------ compose

    async def _compose(self, turn: _Turn) -> AsyncIterator[TurnEvent]:
        profile = self._profile
        parts: list[str] = []
        messages = [*turn.messages, prompts.compose_instruction(turn.notes)]
        t0 = self._clock()
        stats: GenerationStats | None = None
        if turn.turn_deadline.time_remaining() <= profile.deadline_margin_s + 0.05:
            turn.exhausted = True
            turn.note("no time was left to write a full answer")
        else:
            try:
                async with asyncio.timeout(turn.turn_deadline.time_remaining()):
                    stream = self._inference.compose(
                        messages,
                        turn.inp.registry,
                        self._lane("compose", 0, turn),
                        max_tokens=profile.compose_max_tokens,
                        timeout_s=self._timeout(turn.turn_deadline),
                    )
                    async with aclosing(stream):
                        async for item in stream:
                            if isinstance(item, ComposeDone):
                                stats = item.stats
                            elif item.text:
                                parts.append(item.text)
                                yield ComposeText(item.text)
            except (DeadlineExceeded, TimeoutError):
                turn.exhausted = True
                turn.note("the turn's time budget ran out while the answer was written")
            except AgentmeshError as exc:
                turn.failed = not parts
                turn.note(f"the answer could not be completed ({exc.code.name.lower()})")
        wall = self._clock() - t0
        if stats is not None:
            self._account(turn, stats, wall, stage="compose")
            if stats.finish_reason == "LENGTH":
                turn.note("the answer was cut at its length limit")
        else:
            turn.latency.compose += wall

        answer = "".join(parts)  # exactly what the caller saw streamed
        if not answer.strip():
            answer = (
                "I'm sorry, I could not finish this request."
                if not turn.notes
                else "I'm sorry, I could not finish this request in time."
            )
            yield ComposeText(answer)
        if turn.notes and (turn.exhausted or turn.failed or turn.refused):
            suffix = "\n\nWhat I could not do: " + "; ".join(turn.notes) + "."
            yield ComposeText(suffix)
            answer += suffix
        final = Message(Role.ASSISTANT, answer)
        turn.messages.append(final)
        yield MessagesCommitted((final,))

    # ------------------------------------------------------------------ helpers

    def _lane(self, stage: str, level: int, turn: _Turn) -> LaneRequest:
        return LaneRequest(stage=stage, escalation_level=level, lane=turn.inp.forced_lane)

    def _timeout(self, deadline: Deadline) -> float:
        return deadline.timeout(self._profile.deadline_margin_s)

    async def _bounded(self, awaitable: Awaitable[T], deadline: Deadline) -> T:
        """The port call, hard-stopped at the deadline even if the port ignores its timeout."""
        try:
            async with asyncio.timeout(max(0.0, deadline.time_remaining())):
                return await awaitable
        except TimeoutError as exc:
            raise DeadlineExceeded("the turn's budget ran out") from exc

    def _account(self, turn: _Turn, stats: GenerationStats, wall: float, *, stage: str) -> None:
        lane = stats.lane or "unknown"
        entry = turn.usage.setdefault(lane, LaneUsage(lane=lane, model=stats.model))
        entry.model = entry.model or stats.model
        entry.usage.add(stats.usage)
        entry.generations += max(1, stats.generations)
        latency = turn.latency
        if stage == "plan":
            latency.plan += wall
        elif stage == "tool_emit":
            latency.tool_emit += wall
        else:
            latency.compose += wall
        latency.queue_prefill += stats.ttft_s
        if stats.elapsed_s > 0:
            latency.network += max(0.0, wall - stats.elapsed_s)


def _fence(name: str, status: str, body: str) -> str:
    """Fallback fence when the tools service sent none; like its fence, the data cannot close
    the tag (angle brackets become JSON escapes)."""
    safe = body.replace("<", "\\u003c").replace(">", "\\u003e")
    return (
        f'<tool_result name="{name}" status="{status}" trust="untrusted-data">\n'
        f"{safe}\n</tool_result>"
    )
