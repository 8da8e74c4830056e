"""One agent turn, as a list of stages over one typed state:

    fit context -> plan -> emit (one batched parallel generation) -> execute -> observe
    -> continue-or-answer (streamed; a tool call opens another round within the caps)

A confirmed action skips planning: execute exactly the stored action -> answer.

The runner holds no gRPC and no storage: it reads a TurnInput, talks through the ports, and
yields domain events. Every downstream call gets the time left in the turn (turn budget ∩ task
budget ∩ the caller's RPC deadline, minus a margin) as its timeout, so nothing outlives the
turn; cancelling the consuming task cancels the in-flight downstream call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing

from services.orchestrator.loop import prompts
from services.orchestrator.loop.actions import WriteCheck, default_write_checks
from services.orchestrator.loop.context import fit_context
from services.orchestrator.loop.deps import Deps
from services.orchestrator.loop.events import (
    ActionResolved,
    ComposeText,
    Latency,
    MessagesCommitted,
    Outcome,
    ToolCallFinished,
    ToolCallStarted,
    TurnCompleted,
    TurnEvent,
    TurnStarted,
)
from services.orchestrator.loop.policy import AgentProfile
from services.orchestrator.loop.ports import InferencePort, ToolsPort
from services.orchestrator.loop.stages.answer import answer
from services.orchestrator.loop.stages.emit import emit_round, sort_emitted
from services.orchestrator.loop.stages.execute import execute, observe
from services.orchestrator.loop.stages.plan import plan, select
from services.orchestrator.loop.state import NoteKind, TurnInput, TurnState
from services.orchestrator.loop.trace import NoTracer, TurnTrace, TurnTracer
from services.orchestrator.loop.types import (
    Action,
    ActionState,
    EmittedCall,
    Message,
    Role,
    ToolCall,
    ToolDef,
    ToolInvocation,
    ToolOutcome,
)
from shared.deadlines import Deadline
from shared.errors import AgentmeshError

__all__ = ["TurnInput", "TurnRunner"]

SORRY = "I'm sorry, I could not finish this request"


class TurnRunner:
    """Runs turns through the ports under an agent profile."""

    def __init__(
        self,
        inference: InferencePort,
        tools: ToolsPort,
        profile: AgentProfile,
        *,
        checks: Mapping[str, WriteCheck] | None = None,
        clock: Callable[[], float] = time.monotonic,
        tracer: TurnTracer | None = None,
    ) -> None:
        self._d = Deps(
            inference=inference,
            tools=tools,
            profile=profile,
            checks=dict(default_write_checks() if checks is None else checks),
            clock=clock,
            tracer=tracer or NoTracer(),
        )

    @property
    def profile(self) -> AgentProfile:
        return self._d.profile

    # ------------------------------------------------------------------ the turn

    async def run(self, inp: TurnInput) -> AsyncGenerator[TurnEvent, None]:
        started = self._d.clock()
        trace = self._d.tracer.begin(inp, started)
        try:
            async with aclosing(self._run(inp, trace, started)) as events:
                async for event in events:
                    trace.event(event)
                    yield event
        finally:
            trace.close()

    async def _run(
        self, inp: TurnInput, trace: TurnTrace, started: float
    ) -> AsyncGenerator[TurnEvent, None]:
        d = self._d
        st = self._state(inp)
        st.trace = trace
        trace.offered([t.name for t in st.model_tools])
        yield TurnStarted(turn_id=inp.turn_id, turn_index=inp.turn_index)
        yield MessagesCommitted((st.user,))
        await self._fit(st)

        if inp.confirmed_action is not None:
            async for event in self._confirmed(st, inp.confirmed_action):
                yield event
        elif inp.caps.task_budget_s - inp.task_time_used_s <= 0:
            st.note(
                NoteKind.BUDGET, f"the task's time budget ({inp.caps.task_budget_s:g} s) is used up"
            )
        else:
            planned: list[tuple[str, str]] = []
            async for event in plan(d, st, planned):
                yield event
            if planned:
                async for event in emit_round(d, st, planned, round_no=1):
                    yield event

        while not st.has(NoteKind.ANSWER_FAILED):
            chosen: list[EmittedCall] = []
            async for event in answer(d, st, chosen):
                yield event
            if not chosen:
                break
            async for event in self._follow_up(st, chosen):
                yield event

        async for event in self._finish(st, started):
            yield event

    def _state(self, inp: TurnInput) -> TurnState:
        profile = self._d.profile
        caps = inp.caps
        task_left = max(0.0, caps.task_budget_s - inp.task_time_used_s)
        turn_deadline = Deadline.after(min(caps.turn_budget_s, task_left)).earliest(inp.deadline)
        usable = self._usable(inp)
        return TurnState(
            inp=inp,
            turn_deadline=turn_deadline,
            tools_deadline=Deadline(turn_deadline.expires_at - profile.compose_reserve_s),
            base=[
                Message(Role.SYSTEM, profile.system_prompt),
                prompts.customer_context(inp.customer_id),
            ],
            history=self._history(inp.history),
            user=Message(Role.USER, inp.user_message),
            tools={t.name: t for t in usable},
            model_tools=tuple(t.model_view() for t in usable),
            observe_tokens=profile.observe_max_tokens,
        )

    def _usable(self, inp: TurnInput) -> list[ToolDef]:
        """The registry's tools this principal may use under the profile, registry order."""
        principal = inp.principal
        allowed = set(self._d.profile.allowed_tools)
        return [
            t for t in inp.registry if principal.may_use(t) and (not allowed or t.name in allowed)
        ]

    def _history(self, history: Sequence[Message]) -> list[Message]:
        """Earlier turns as the prompt sees them: without old tool traffic unless kept."""
        keep = self._d.profile.keep_past_tool_results
        return [m for m in history if keep or (m.role is not Role.TOOL and not m.tool_calls)]

    async def _fit(self, st: TurnState) -> None:
        """Budget the prompt to the lane's window in its own tokens (see loop/context.py)."""
        d = self._d
        profile = d.profile
        t0 = d.clock()
        try:
            fitted = await d.bounded(
                fit_context(
                    d.inference,
                    d.lane("plan", 0, st),
                    base=st.base,
                    history=st.history,
                    user=st.user,
                    tools=st.model_tools,
                    max_output_tokens=max(
                        profile.compose_max_tokens,
                        profile.plan_max_tokens,
                        profile.tool_call_max_tokens or 0,
                    ),
                    max_calls=min(st.calls_left(), st.inp.caps.max_tool_calls_per_turn),
                    observe_max_tokens=profile.observe_max_tokens,
                    user_max_share=profile.user_message_max_share,
                    margin_tokens=profile.context_margin_tokens,
                    timeout_s=d.timeout(st.tools_deadline),
                ),
                st.tools_deadline,
            )
        except AgentmeshError as exc:
            st.trace.stage("context", t0, d.clock())
            st.note(
                NoteKind.CONTEXT, f"the context could not be measured ({exc.code.name.lower()})"
            )
            return
        st.trace.stage("context", t0, d.clock())
        st.history = fitted.history
        st.user = fitted.user
        st.observe_tokens = fitted.observe_tokens
        if fitted.dropped_messages:
            st.note(NoteKind.CONTEXT, f"{fitted.dropped_messages} older messages left out to fit")
        if fitted.user_cut:
            st.note(NoteKind.CONTEXT, "the message was cut to fit the context window")

    async def _follow_up(
        self, st: TurnState, chosen: list[EmittedCall]
    ) -> AsyncIterator[TurnEvent]:
        """Calls the continue-or-answer stage opened: one more round."""
        d = self._d
        st.rounds += 1
        names = list(dict.fromkeys(c.call.name for c in chosen if c.call.name in st.tools))
        failed, good = sort_emitted(names, chosen)
        invalid: dict[str, str] = {}
        if good:
            async for event in execute(d, st, [c.call for c in good], st.rounds, invalid):
                yield event
        failed.update(invalid)
        if failed and not st.has(NoteKind.BUDGET):
            st.rounds -= 1  # the ladder's re-emission belongs to this round
            async for event in emit_round(
                d, st, [(n, "") for n in failed], round_no=st.rounds + 1, feedback=failed
            ):
                yield event

    # ------------------------------------------------------------------ evaluation

    async def select_tools(self, inp: TurnInput) -> tuple[list[str], list[str]]:
        """The plan stage alone, as a turn runs it: (the tools the plan chose, the tools the
        profile's selection mode runs). For evaluation on labelled turns and replays."""
        st = self._state(inp)
        await self._fit(st)
        chosen: list[tuple[str, str]] = []
        async for _ in plan(self._d, st, chosen):
            pass
        return list(st.planned), [name for name, _ in chosen]

    def apply_selection(self, inp: TurnInput, planned: Sequence[str], mode: str) -> list[str]:
        """What ``mode`` ("plan" / "default_reads") would run for a plan choosing ``planned``."""
        profile = self._d.profile.model_copy(update={"tool_selection": mode})
        usable = {t.name for t in self._usable(inp)}
        return [name for name, _ in select(profile, usable, [(n, "") for n in planned])]

    # ------------------------------------------------------------------ confirmed action

    async def _confirmed(self, st: TurnState, action: Action) -> AsyncIterator[TurnEvent]:
        """Execute exactly the stored action, with its own idempotency key, then answer."""
        d = self._d
        st.rounds = st.inp.caps.max_rounds_per_turn  # the answer after it calls no tools
        tool = st.tools.get(action.tool)
        call = ToolCall(f"call_{st.inp.turn_index}_1_1", action.tool, action.arguments_json)
        yield ToolCallStarted(call.id, call.name, call.arguments_json, 1)
        outcome: ToolOutcome | None = None
        if tool is None:
            outcome = ToolOutcome(call.id, call.name, "PERMISSION_DENIED", "tool not available")
        else:
            t0 = d.clock()
            try:
                results = await d.bounded(
                    d.tools.execute(
                        [
                            ToolInvocation(
                                call_id=call.id,
                                name=call.name,
                                arguments_json=call.arguments_json,
                                idempotency_key=action.idempotency_key,
                                timeout_ms=tool.timeout_ms,
                            )
                        ],
                        principal=st.inp.principal,
                        timeout_s=d.timeout(st.tools_deadline),
                    ),
                    st.tools_deadline,
                )
                outcome = results[0] if results else None
            except AgentmeshError:
                outcome = None
            st.latency.tool_wall += d.clock() - t0
            st.calls += 1
        if outcome is None:
            # The result is unknown: the action stays EXECUTING; confirming again replays it
            # under the same idempotency key, so money still moves at most once.
            st.note(
                NoteKind.ACTION_FAILED,
                "the action's result could not be confirmed; confirm it again to retry safely",
            )
            yield ToolCallFinished.not_run(call, "UNAVAILABLE", "the tool service failed", 1)
            return
        done = dataclasses.replace(
            action,
            state=ActionState.EXECUTED if outcome.ok else ActionState.FAILED,
            resolved_at=time.time(),
            result_json=outcome.result_json if outcome.ok else "",
            error_message="" if outcome.ok else outcome.error_message,
        )
        if not outcome.ok:
            st.note(NoteKind.DECLINED, f"{action.summary} failed: {outcome.error_message}")
        yield ToolCallFinished.ran(call, outcome, 1)
        body = outcome.result_json if outcome.ok else f'{{"error": "{outcome.status}"}}'
        fenced, _ = await observe(d, st, [call], {call.id: outcome}, {call.id: body})
        assistant = Message(Role.ASSISTANT, "", tool_calls=(call,))
        result = Message(Role.TOOL, fenced[call.id], tool_call_id=call.id, name=call.name)
        st.traffic.extend([assistant, result])
        yield ActionResolved(done)
        yield MessagesCommitted((assistant, result), tool_calls_executed=1)

    # ------------------------------------------------------------------ settled actions

    async def settled(self, inp: TurnInput, action: Action) -> AsyncGenerator[TurnEvent, None]:
        """A rejected proposal, or a confirmation of one already executed: nothing runs and
        no model is called; the turn says where the action stands."""
        yield TurnStarted(turn_id=inp.turn_id, turn_index=inp.turn_index)
        yield MessagesCommitted((Message(Role.USER, inp.user_message),))
        yield ActionResolved(action)
        if action.state is ActionState.EXECUTED:
            text = f"This was already done: {action.summary}."
        else:
            text = f"Understood: I will not do this: {action.summary}."
        yield ComposeText(text)
        yield MessagesCommitted((Message(Role.ASSISTANT, text),))
        yield TurnCompleted(
            turn_id=inp.turn_id,
            answer=text,
            outcome=Outcome.COMPLETED,
            usage=(),
            latency=Latency(),
            tool_calls=0,
            task_tool_calls=inp.task_tool_calls,
            notes=(),
            llm_stages=0,
        )

    # ------------------------------------------------------------------ the end

    async def _finish(self, st: TurnState, started: float) -> AsyncIterator[TurnEvent]:
        answer_text = st.answer
        tail = ""
        if not answer_text.strip():
            # "in time" only when time ran out; what else went wrong is told just below.
            tail = SORRY + (" in time." if st.has(NoteKind.BUDGET) else ".")
        told = st.told()
        if told:
            tail += ("\n\n" if answer_text.strip() or tail else "") + (
                "What I could not do: " + "; ".join(told) + "."
            )
        for action in st.proposals:
            tail += (
                f"\n\nProposed, not done yet: {action.summary}. Confirm it to go ahead "
                f"(action {action.action_id}), or reject it."
            )
        if tail:
            yield ComposeText(tail)
        final = Message(Role.ASSISTANT, answer_text + tail)
        yield MessagesCommitted((final,))
        st.latency.total = self._d.clock() - started
        yield TurnCompleted(
            turn_id=st.inp.turn_id,
            answer=final.content,
            outcome=st.outcome(),
            usage=tuple(st.usage.values()),
            latency=st.latency,
            tool_calls=st.calls,
            task_tool_calls=st.task_calls,
            notes=tuple(n.text for n in st.notes),
            llm_stages=st.llm_stages,
        )
