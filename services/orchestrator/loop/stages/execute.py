"""Execute + observe: the guards, one concurrent batch on behalf of the session's principal,
then every result folded once into the prompt: fenced as untrusted data and cut to the
turn's observation size in the lane's own tokens."""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import AsyncIterator, Sequence

from services.orchestrator.loop import guards
from services.orchestrator.loop.context import CUT_MARKER
from services.orchestrator.loop.deps import Deps
from services.orchestrator.loop.events import (
    ActionProposed,
    MessagesCommitted,
    ToolCallFinished,
    ToolCallStarted,
    TurnEvent,
)
from services.orchestrator.loop.state import NoteKind, TurnState
from services.orchestrator.loop.types import (
    Message,
    Role,
    ToolCall,
    ToolInvocation,
    ToolOutcome,
    canonical_args,
)
from shared.errors import AgentmeshError, DeadlineExceeded

INVALID_ARGUMENT = "INVALID_ARGUMENT"
DECLINED = guards.DECLINED
PROPOSED = guards.PROPOSED


async def execute(
    d: Deps,
    st: TurnState,
    calls: Sequence[ToolCall],
    round_no: int,
    invalid: dict[str, str],
) -> AsyncIterator[TurnEvent]:
    """Failures become observations, never a failed turn; ``invalid`` collects the calls the
    tools service refused as INVALID_ARGUMENT (they enter the failure ladder)."""
    inp = st.inp
    to_run: list[tuple[ToolCall, ToolInvocation]] = []
    skipped: dict[str, guards.Skip] = {}
    proposed: dict[str, guards.Propose] = {}
    recorded: list[ToolCall] = []
    for raw in calls:
        st.call_seq += 1
        tool = st.tools[raw.name]
        call = ToolCall(
            id=f"call_{inp.turn_index}_{round_no}_{st.call_seq}",
            name=raw.name,
            arguments_json=canonical_args(inp.principal.fill(tool, raw.arguments_json)),
        )
        verdict = await guards.verdict(d, st, call, len(to_run))
        if isinstance(verdict, guards.Skip):
            skipped[call.id] = verdict
        elif isinstance(verdict, guards.Propose):
            proposed[call.id] = verdict
            st.proposals.append(verdict.action)
        else:
            to_run.append((call, _invocation(call, tool.timeout_ms)))
        st.seen.add((call.name, call.arguments_json))
        recorded.append(call)

    for call, _ in to_run:
        yield ToolCallStarted(call.id, call.name, call.arguments_json, round_no)
    outcomes = await _run_batch(d, st, to_run)

    t_obs = d.clock()
    finished: list[ToolCallFinished] = []
    bodies: dict[str, str] = {}
    for call in recorded:
        if call.id in skipped:
            skip = skipped[call.id]
            bodies[call.id] = f"[{skip.status}] {call.name}: {skip.why}."
            finished.append(ToolCallFinished.not_run(call, skip.status, skip.why, round_no))
        elif call.id in proposed:
            action = proposed[call.id].action
            bodies[call.id] = (
                f"[{PROPOSED}] {call.name}: {action.summary}. Not done yet: it runs only after "
                "the customer confirms it."
            )
            finished.append(ToolCallFinished.not_run(call, PROPOSED, "", round_no))
        else:
            outcome = outcomes.get(call.id) or ToolOutcome(
                call.id, call.name, "INTERNAL", error_message="no result was returned"
            )
            if outcome.status == INVALID_ARGUMENT:
                invalid[call.name] = outcome.error_message or "arguments failed validation"
            elif not outcome.ok:
                st.note(NoteKind.TOOL_FAILED, f"{call.name} failed ({outcome.status.lower()})")
            finished.append(ToolCallFinished.ran(call, outcome, round_no))
            bodies[call.id] = _payload(outcome)
    fenced, cut = await observe(d, st, recorded, outcomes, bodies)
    tool_messages = [
        Message(Role.TOOL, fenced[c.id], tool_call_id=c.id, name=c.name) for c in recorded
    ]
    assistant = Message(Role.ASSISTANT, "", tool_calls=tuple(recorded))
    st.traffic.extend([assistant, *tool_messages])
    t_end = d.clock()
    st.latency.observe += t_end - t_obs
    st.trace.stage("observe", t_obs, t_end)
    for event in finished:
        if event.call_id in cut:
            event = dataclasses.replace(event, truncated=True)
        yield event
    for p in proposed.values():
        yield ActionProposed(p.action)
    yield MessagesCommitted((assistant, *tool_messages), tool_calls_executed=len(to_run))


def _invocation(call: ToolCall, timeout_ms: int) -> ToolInvocation:
    return ToolInvocation(
        call_id=call.id, name=call.name, arguments_json=call.arguments_json, timeout_ms=timeout_ms
    )


async def _run_batch(
    d: Deps, st: TurnState, to_run: list[tuple[ToolCall, ToolInvocation]]
) -> dict[str, ToolOutcome]:
    if not to_run:
        return {}
    t0 = d.clock()
    try:
        results = await d.bounded(
            d.tools.execute(
                [inv for _, inv in to_run],
                principal=st.inp.principal,
                timeout_s=d.timeout(st.tools_deadline),
            ),
            st.tools_deadline,
        )
        outcomes = {r.call_id: r for r in results}
    except AgentmeshError as exc:
        if isinstance(exc, DeadlineExceeded):
            st.note(NoteKind.BUDGET, "the turn's time budget ran out while tools ran")
        outcomes = {
            call.id: ToolOutcome(
                call.id, call.name, exc.code.name, error_message="the tool service failed"
            )
            for call, _ in to_run
        }
    t1 = d.clock()
    wall = t1 - t0
    st.trace.stage("tool_wall", t0, t1)
    st.latency.tool_wall += wall
    server = max((o.latency_s for o in outcomes.values()), default=0.0)
    if server > 0:
        st.latency.network += max(0.0, wall - server)
    st.calls += len(to_run)
    return outcomes


def _payload(outcome: ToolOutcome) -> str:
    if outcome.ok:
        return outcome.result_json or "{}"
    return json.dumps({"error": outcome.error_message}, ensure_ascii=False)


async def observe(
    d: Deps,
    st: TurnState,
    recorded: Sequence[ToolCall],
    outcomes: dict[str, ToolOutcome],
    bodies: dict[str, str],
) -> tuple[dict[str, str], set[str]]:
    """Each body escaped, cut once to ``st.observe_tokens`` lane tokens, then fenced (so the
    closing tag is always intact). Returns (call id -> tool message, ids that were cut)."""
    ids = [c.id for c in recorded]
    safe = [bodies[i].replace("<", "\\u003c").replace(">", "\\u003e") for i in ids]
    cut: set[str] = set()
    try:
        count = await d.bounded(
            d.inference.count_tokens(
                (),
                (),
                d.lane("tool_call", 0, st),
                texts=safe,
                truncate_to=st.observe_tokens,
                timeout_s=d.timeout(st.turn_deadline),
            ),
            st.turn_deadline,
        )
        cuts = list(count.truncated_texts) + [None] * len(ids)
    except AgentmeshError:
        # Without a token count, a conservative cut: no tokenizer spends < 2 chars a token.
        limit = st.observe_tokens * 2
        cuts = [s[:limit] if len(s) > limit else None for s in safe]
    fenced: dict[str, str] = {}
    for call, body, short in zip(recorded, safe, cuts, strict=False):
        if short is not None:
            body = short + CUT_MARKER
            cut.add(call.id)
        outcome = outcomes.get(call.id)
        status = outcome.status if outcome is not None else "SKIPPED"
        source = html.escape(outcome.source if outcome is not None else "orchestrator", quote=True)
        fenced[call.id] = (
            f'<tool_result tool="{call.name}" call_id="{call.id}" source="{source}" '
            f'status="{status}" trust="untrusted-data">\n{body}\n</tool_result>'
        )
    return fenced, cut
