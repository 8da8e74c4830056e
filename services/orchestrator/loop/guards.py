"""The small named guards every emitted call passes before anything runs.

Order: duplicate stop, caps, then the write guard (a write is turned into a proposal with
frozen arguments, never executed here). Each returns a verdict; the execute stage acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.orchestrator.loop.actions import Declined, new_action, parse_args
from services.orchestrator.loop.deps import Deps
from services.orchestrator.loop.state import NoteKind, TurnState
from services.orchestrator.loop.types import Action, Effect, ToolCall

SKIPPED_DUPLICATE = "SKIPPED_DUPLICATE"
SKIPPED_CAP = "SKIPPED_CAP"
DECLINED = "DECLINED"
PROPOSED = "PROPOSED"


@dataclass(frozen=True)
class Run:
    pass


@dataclass(frozen=True)
class Skip:
    status: str
    why: str


@dataclass(frozen=True)
class Propose:
    action: Action


Verdict = Run | Skip | Propose


def duplicate_stop(st: TurnState, call: ToolCall) -> Skip | None:
    if (call.name, call.arguments_json) in st.seen:
        st.note(
            NoteKind.DUPLICATE, f"a repeated {call.name} call with the same arguments was stopped"
        )
        return Skip(SKIPPED_DUPLICATE, "identical call already made this turn")
    return None


def cap_guard(st: TurnState, queued: int) -> Skip | None:
    if queued >= st.calls_left():
        st.note(NoteKind.CAP, st.cap_text())
        return Skip(SKIPPED_CAP, st.cap_text())
    return None


async def write_guard(d: Deps, st: TurnState, call: ToolCall) -> Skip | Propose | None:
    """A write becomes a proposal when its check accepts the arguments; None for reads."""
    tool = st.tools[call.name]
    if tool.effect is not Effect.WRITE:
        return None
    if st.proposals:
        why = "one action is proposed at a time"
    elif (check := d.checks.get(call.name)) is None:
        why = "no approval policy exists for this action"
    else:
        got = await check.propose(parse_args(call.arguments_json), d.reader(st), d.limits(st))
        if not isinstance(got, Declined):
            return Propose(
                new_action(
                    session_id=st.inp.session_id,
                    turn_index=st.inp.turn_index,
                    tool=call.name,
                    arguments_json=call.arguments_json,
                    proposal=got,
                    policy=d.profile.actions,
                )
            )
        why = got.reason
    st.note(NoteKind.DECLINED, f"{call.name} could not be proposed: {why}")
    return Skip(DECLINED, why)


async def verdict(d: Deps, st: TurnState, call: ToolCall, queued: int) -> Verdict:
    skip = duplicate_stop(st, call)
    if skip is not None:
        return skip
    tool = st.tools[call.name]
    if tool.effect is Effect.WRITE:
        return await write_guard(d, st, call) or Run()
    return cap_guard(st, queued) or Run()
