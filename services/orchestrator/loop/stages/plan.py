"""Stage 1, plan: which tools to call now and what each is for (one JSON-constrained
generation). The profile's selection mode turns the plan into the round's calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Container, Sequence

from services.orchestrator.loop import prompts
from services.orchestrator.loop.deps import Deps
from services.orchestrator.loop.events import PlanMade, PlannedCall, TurnEvent
from services.orchestrator.loop.policy import AgentProfile
from services.orchestrator.loop.state import NoteKind, TurnState
from shared.errors import AgentmeshError, DeadlineExceeded


async def plan(d: Deps, st: TurnState, out: list[tuple[str, str]]) -> AsyncIterator[TurnEvent]:
    """Appends the round's (tool, intent) pairs to ``out``."""
    profile = d.profile
    names = [t.name for t in st.model_tools]
    left = st.calls_left()
    if not names:
        return
    if left == 0:
        st.note(NoteKind.CAP, st.cap_text())
        return
    if st.tools_deadline.time_remaining() < profile.min_round_s + profile.deadline_margin_s:
        st.note(NoteKind.BUDGET, "the turn's time budget ran out before tools could run")
        return
    t0 = d.clock()
    lane = ""
    try:
        messages = [
            *st.messages(),
            prompts.plan_instruction(
                names, left, profile.default_tools, signed_in=not st.inp.principal.anonymous
            ),
        ]
        result = await d.bounded(
            d.inference.plan(
                messages,
                st.model_tools,
                d.lane("plan", 0, st),
                json_schema=prompts.plan_schema(names, left, profile.plan_intent_max_chars),
                max_tokens=profile.plan_max_tokens,
                timeout_s=d.timeout(st.tools_deadline),
            ),
            st.tools_deadline,
        )
        d.account(st, result.stats, d.clock() - t0, stage="plan")
        lane = result.stats.lane
        parsed = prompts.parse_plan(result.text, names)
    except DeadlineExceeded:
        st.latency.plan += d.clock() - t0
        st.note(NoteKind.BUDGET, "the turn's time budget ran out while planning")
        return
    except AgentmeshError as exc:
        st.latency.plan += d.clock() - t0
        st.note(NoteKind.STAGE_FAILED, f"planning failed ({exc.code.name.lower()})")
        parsed = prompts.ParsedPlan(calls=(), reasoning="", parsed=False)

    st.planned = parsed.tools
    calls = select(profile, st.tools, parsed.calls)
    if len(calls) > left:
        st.note(NoteKind.CAP, st.cap_text())
        calls = calls[:left]
    out.extend(calls)
    yield PlanMade(
        text=parsed.reasoning,
        chosen_tools=tuple(n for n, _ in calls),
        lane=lane,
        round=1,
        calls=tuple(PlannedCall(n, i) for n, i in calls),
    )


def select(
    profile: AgentProfile, usable: Container[str], planned: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The plan's calls under the profile, among the ``usable`` tools: forced tools first,
    then the reference reads as a default the plan overrides by choosing nothing."""
    chosen: dict[str, str] = {}
    for name in profile.required_first_round_tools:
        if name in usable:
            chosen[name] = dict(planned).get(name, "")
    if profile.tool_selection == "default_reads" and planned:
        for name in profile.default_tools:
            if name in usable:
                chosen.setdefault(name, dict(planned).get(name, ""))
    for name, intent in planned:
        if name in usable:
            chosen.setdefault(name, intent)
    return list(chosen.items())
