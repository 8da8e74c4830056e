"""Stage 2, emission: one batched parallel generation for the planned calls, each seeing the
plan's intents. Invalid calls walk the failure ladder: re-prompt once with the schema, then
escalate one lane."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from services.orchestrator.loop import prompts
from services.orchestrator.loop.actions import Declined
from services.orchestrator.loop.deps import Deps
from services.orchestrator.loop.events import (
    Escalated,
    EscalationKind,
    ToolCallFinished,
    TurnEvent,
)
from services.orchestrator.loop.stages.execute import DECLINED, INVALID_ARGUMENT, execute
from services.orchestrator.loop.state import NoteKind, TurnState
from services.orchestrator.loop.types import Effect, EmittedCall, ToolCall, ToolDef
from shared.errors import AgentmeshError, DeadlineExceeded


async def narrowed_tools(
    d: Deps, st: TurnState, names: Sequence[str]
) -> tuple[dict[str, ToolDef], dict[str, str]]:
    """The model views of ``names``; a write's schema narrowed to the session's records.
    Returns (tools by name, writes declined with their reason)."""
    views: dict[str, ToolDef] = {}
    declined: dict[str, str] = {}
    model = {t.name: t for t in st.model_tools}
    for name in names:
        tool = st.tools[name]
        view = model[name]
        if tool.effect is Effect.WRITE:
            check = d.checks.get(name)
            if check is None:
                declined[name] = "no approval policy exists for this action"
                continue
            got = await check.narrow(view, d.reader(st), d.limits(st))
            if isinstance(got, Declined):
                declined[name] = got.reason
                continue
            view = got
        views[name] = view
    return views, declined


async def emit_round(
    d: Deps,
    st: TurnState,
    planned: Sequence[tuple[str, str]],
    round_no: int,
    feedback: dict[str, str] | None = None,
) -> AsyncIterator[TurnEvent]:
    profile = d.profile
    st.rounds += 1
    intents = dict(planned)
    views, declined = await narrowed_tools(d, st, list(intents))
    for name, why in declined.items():
        st.note(NoteKind.DECLINED, f"{name} could not be proposed: {why}")
        yield ToolCallFinished.not_run(ToolCall("", name, ""), DECLINED, why, round_no)
    pending = [n for n in intents if n in views]
    feedback = dict(feedback or {})
    reprompted = bool(feedback)
    while pending:
        level = st.tool_level
        lane_name = st.inp.forced_lane or profile.lane_name(level)
        override = profile.override_for(lane_name)
        # The prompt renders the registry as the model knows it (prefix cache); the grammar
        # of each call comes from its (possibly narrowed) view.
        offered = [views.get(t.name, t) for t in st.model_tools]
        messages = [
            *st.messages(),
            prompts.tool_call_instruction([(n, intents.get(n, "")) for n in pending]),
        ]
        if feedback:
            messages.append(prompts.reprompt_with_schema(feedback, views))
        t0 = d.clock()
        try:
            emitted = await d.bounded(
                d.inference.emit_tool_calls(
                    messages,
                    offered,
                    pending,
                    d.lane("tool_call", level, st),
                    parallel=profile.parallel_tool_calls,
                    decoding=override.tool_decoding,
                    max_tokens=override.tool_call_max_tokens or profile.tool_call_max_tokens,
                    timeout_s=d.timeout(st.tools_deadline),
                ),
                st.tools_deadline,
            )
        except DeadlineExceeded:
            st.latency.tool_emit += d.clock() - t0
            st.note(NoteKind.BUDGET, "the turn's time budget ran out while emitting tool calls")
            return
        except AgentmeshError as exc:
            st.latency.tool_emit += d.clock() - t0
            st.note(
                NoteKind.STAGE_FAILED, f"tool calls could not be emitted ({exc.code.name.lower()})"
            )
            return
        wall = d.clock() - t0
        failed, good = sort_emitted(pending, emitted.calls)
        d.account(st, emitted.stats, wall, stage="tool_emit", parse_failures=len(failed))
        invalid: dict[str, str] = {}
        if good:
            async for event in execute(d, st, [c.call for c in good], round_no, invalid):
                yield event
        failed.update(invalid)
        if not failed or st.has(NoteKind.BUDGET):
            return

        reason = "; ".join(f"{n}: {r}" for n, r in failed.items())
        if not reprompted:
            reprompted = True
            yield Escalated(EscalationKind.REPROMPT_WITH_SCHEMA, lane_name, lane_name, reason)
        elif (
            not st.inp.forced_lane
            and st.lane_escalations < profile.max_lane_escalations
            and level + 1 < max(1, len(profile.lane_ladder))
        ):
            st.lane_escalations += 1
            st.tool_level = level + 1
            yield Escalated(
                EscalationKind.LANE_ESCALATION, lane_name, profile.lane_name(level + 1), reason
            )
        else:
            for name, why in failed.items():
                st.note(NoteKind.INVALID_CALL, f"{name} could not be called with valid arguments")
                if name not in invalid:
                    yield ToolCallFinished.not_run(
                        ToolCall("", name, ""), INVALID_ARGUMENT, why, round_no
                    )
            return
        feedback = failed
        pending = [n for n in failed if n in views]


def sort_emitted(
    pending: Sequence[str], calls: Sequence[EmittedCall]
) -> tuple[dict[str, str], list[EmittedCall]]:
    """(failed name -> why, good calls): one call per pending name, the first one emitted."""
    by_name: dict[str, EmittedCall] = {}
    for call in calls:
        if call.call.name in pending and call.call.name not in by_name:
            by_name[call.call.name] = call
    failed: dict[str, str] = {}
    good: list[EmittedCall] = []
    for name in pending:
        got = by_name.get(name)
        if got is None:
            failed[name] = "no call was emitted"
        elif not got.ok:
            failed[name] = got.parse_error or "the call did not parse"
        else:
            good.append(got)
    return failed, good
