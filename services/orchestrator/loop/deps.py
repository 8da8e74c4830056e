"""What every stage needs: the ports, the profile, the write checks, the clock, and the few
helpers that bound and account downstream calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.orchestrator.loop.actions import Limits, RecordReader, WriteCheck
from services.orchestrator.loop.events import LaneUsage
from services.orchestrator.loop.policy import AgentProfile
from services.orchestrator.loop.ports import InferencePort, ToolsPort
from services.orchestrator.loop.state import NoteKind, TurnState
from services.orchestrator.loop.trace import NoTracer, TurnTracer
from services.orchestrator.loop.types import (
    GenerationStats,
    LaneRequest,
    ToolInvocation,
)
from shared.deadlines import Deadline
from shared.errors import AgentmeshError, DeadlineExceeded

T = TypeVar("T")


@dataclass(frozen=True)
class Deps:
    inference: InferencePort
    tools: ToolsPort
    profile: AgentProfile
    checks: Mapping[str, WriteCheck]
    clock: Callable[[], float]
    tracer: TurnTracer = field(default_factory=NoTracer)

    def lane(self, stage: str, level: int, st: TurnState) -> LaneRequest:
        return LaneRequest(
            stage=stage,
            escalation_level=level,
            lane=st.inp.forced_lane,
            session_id=st.inp.session_id,
        )

    def timeout(self, deadline: Deadline) -> float:
        return deadline.timeout(self.profile.deadline_margin_s)

    async def bounded(self, awaitable: Awaitable[T], deadline: Deadline) -> T:
        """The port call, hard-stopped at the deadline even if the port ignores its timeout."""
        try:
            async with asyncio.timeout(max(0.0, deadline.time_remaining())):
                return await awaitable
        except TimeoutError as exc:
            raise DeadlineExceeded("the turn's budget ran out") from exc

    def account(
        self,
        st: TurnState,
        stats: GenerationStats,
        wall: float,
        *,
        stage: str,
        parse_failures: int = 0,
        first_chunk_s: float | None = None,
    ) -> None:
        """One sequential LLM stage: usage per lane, the latency table, the stage count
        (and the stage to the turn's observer)."""
        end = self.clock()
        st.trace.llm(
            stage,
            end - wall,
            end,
            stats,
            level=st.tool_level if stage == "tool_emit" else 0,
            parse_failures=parse_failures,
            first_chunk_s=first_chunk_s,
        )
        st.llm_stages += 1
        for text in stats.route_notes:
            st.note(NoteKind.LANE_FAILOVER, text)
        lane = stats.lane or "unknown"
        entry = st.usage.setdefault(lane, LaneUsage(lane=lane, model=stats.model))
        entry.model = entry.model or stats.model
        entry.usage.add(stats.usage)
        entry.generations += max(1, stats.generations)
        latency = st.latency
        if stage == "plan":
            latency.plan += wall
        elif stage == "tool_emit":
            latency.tool_emit += wall
        else:
            latency.compose += wall
        latency.queue_prefill += stats.ttft_s
        if stats.elapsed_s > 0:
            latency.network += max(0.0, wall - stats.elapsed_s)

    def limits(self, st: TurnState) -> Limits:
        committed = st.inp.session_committed_cents + sum(a.amount_cents for a in st.proposals)
        return Limits(self.profile.actions, committed)

    def reader(self, st: TurnState) -> RecordReader:
        """Reads the bound customer's records for the write checks (not model tool calls)."""

        async def read(name: str, args: dict[str, Any]) -> dict[str, Any] | None:
            tool = st.tools.get(name)
            if tool is None:
                return None
            st.call_seq += 1
            invocation = ToolInvocation(
                call_id=f"check_{st.inp.turn_index}_{st.call_seq}",
                name=name,
                arguments_json=st.inp.principal.fill(tool, _dumps(args)),
                timeout_ms=tool.timeout_ms,
            )
            try:
                results = await self.bounded(
                    self.tools.execute(
                        [invocation],
                        principal=st.inp.principal,
                        timeout_s=self.timeout(st.tools_deadline),
                    ),
                    st.tools_deadline,
                )
            except AgentmeshError:
                return None
            if not results or not results[0].ok:
                return None
            return _loads(results[0].result_json)

        return read


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _loads(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
