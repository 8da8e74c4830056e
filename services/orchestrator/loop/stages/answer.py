"""Stage 3, continue or answer: one generation in the lane's native function-calling format.
Text is streamed to the caller as the answer; a tool call instead opens another round (while
caps and rounds allow)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from services.orchestrator.loop import prompts
from services.orchestrator.loop.deps import Deps
from services.orchestrator.loop.events import ComposeText, TurnEvent
from services.orchestrator.loop.state import NoteKind, TurnState
from services.orchestrator.loop.types import (
    ComposeDone,
    EmittedCall,
    GenerationStats,
    ToolCallsChosen,
)
from shared.errors import AgentmeshError, DeadlineExceeded


def tool_choice(d: Deps, st: TurnState) -> str:
    """Whether this generation may open another tool round. A lane that always wants more
    tools is told it hit the cap when calls or rounds run out."""
    if st.proposals or not st.model_tools:
        return "none"
    if st.calls_left() == 0 or st.rounds_left() == 0:
        if d.profile.always_use_tools:
            rounds = st.inp.caps.max_rounds_per_turn
            text = (
                st.cap_text()
                if st.calls_left() == 0
                else f"stopped after {rounds} tool rounds (the turn's cap)"
            )
            st.note(NoteKind.CAP, text)
        return "none"
    if st.tools_deadline.time_remaining() < d.profile.min_round_s + d.profile.deadline_margin_s:
        return "none"
    return "required" if d.profile.always_use_tools else "auto"


async def answer(d: Deps, st: TurnState, chosen: list[EmittedCall]) -> AsyncIterator[TurnEvent]:
    """Streams the answer into ``st.answer``, or appends the calls it chose to ``chosen``."""
    profile = d.profile
    choice = tool_choice(d, st)
    messages = [
        *st.messages(),
        prompts.answer_instruction(st.told(), choice != "none", [a.summary for a in st.proposals]),
    ]
    parts: list[str] = []
    stats: GenerationStats | None = None
    t0 = d.clock()
    first_chunk: float | None = None
    if st.turn_deadline.time_remaining() <= profile.deadline_margin_s + 0.05:
        st.note(NoteKind.BUDGET, "no time was left to write a full answer")
        return
    try:
        async with asyncio.timeout(st.turn_deadline.time_remaining()):
            stream = d.inference.answer(
                messages,
                st.model_tools,
                d.lane("compose", 0, st),
                tool_choice=choice,
                max_calls=max(1, st.calls_left()),
                max_tokens=profile.compose_max_tokens,
                timeout_s=d.timeout(st.turn_deadline),
            )
            async with aclosing(stream):
                async for item in stream:
                    if isinstance(item, ComposeDone):
                        stats = item.stats
                    elif isinstance(item, ToolCallsChosen):
                        chosen.extend(item.calls)
                    elif item.text:
                        if first_chunk is None:
                            first_chunk = d.clock() - t0
                        parts.append(item.text)
                        yield ComposeText(item.text)
    except (DeadlineExceeded, TimeoutError):
        st.note(NoteKind.BUDGET, "the turn's time budget ran out while the answer was written")
    except AgentmeshError as exc:
        # A dead downstream mid-answer: the turn failed, whatever was streamed so far.
        st.note(
            NoteKind.ANSWER_FAILED, f"the answer could not be completed ({exc.code.name.lower()})"
        )
    wall = d.clock() - t0
    if stats is not None:
        d.account(st, stats, wall, stage="compose", first_chunk_s=first_chunk)
        if stats.finish_reason == "LENGTH":
            st.note(NoteKind.CONTEXT, "the answer was cut at its length limit")
    else:
        st.latency.compose += wall
        st.trace.stage("compose", t0, t0 + wall)
    st.answer += "".join(parts)
