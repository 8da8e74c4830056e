"""What the turn loop tells an observer: the stages as they end, the LLM calls with their
stats, and every event of the turn. Tracing (OpenTelemetry spans) and turn recording (replay
traces) implement it outside the loop; the loop itself stays free of both.

Times are the loop's own clock (``Deps.clock``, monotonic seconds); an observer maps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from services.orchestrator.loop.events import TurnEvent
from services.orchestrator.loop.types import GenerationStats

if TYPE_CHECKING:
    from services.orchestrator.loop.state import TurnInput


class TurnTrace(Protocol):
    """The observer of one turn."""

    def offered(self, tools: Sequence[str]) -> None:
        """The tools the model is offered in this turn (after principal and profile)."""

    def stage(self, stage: str, start: float, end: float) -> None:
        """A stage without a model call ended: context, tool_wall, observe."""

    def llm(
        self,
        stage: str,
        start: float,
        end: float,
        stats: GenerationStats,
        *,
        level: int = 0,
        parse_failures: int = 0,
        first_chunk_s: float | None = None,
    ) -> None:
        """One LLM stage ended (plan, tool_emit, compose): its lane, usage and timing."""

    def event(self, event: TurnEvent) -> None:
        """Every event the turn yields, in order (the last one is TurnCompleted)."""

    def close(self) -> None:
        """The turn's generator finished or was closed (always called, once)."""


class TurnTracer(Protocol):
    def begin(self, inp: TurnInput, started: float) -> TurnTrace: ...


class NoTrace:
    """Observes nothing: an observer subclasses it and overrides only the hooks it uses."""

    def offered(self, tools: Sequence[str]) -> None:
        pass

    def stage(self, stage: str, start: float, end: float) -> None:
        pass

    def llm(
        self,
        stage: str,
        start: float,
        end: float,
        stats: GenerationStats,
        *,
        level: int = 0,
        parse_failures: int = 0,
        first_chunk_s: float | None = None,
    ) -> None:
        pass

    def event(self, event: TurnEvent) -> None:
        pass

    def close(self) -> None:
        pass


class NoTracer:
    def begin(self, inp: TurnInput, started: float) -> TurnTrace:
        return NoTrace()


class Fanout:
    """Several observers of one turn, told in order."""

    def __init__(self, traces: Sequence[TurnTrace]) -> None:
        self._traces = list(traces)

    def offered(self, tools: Sequence[str]) -> None:
        for t in self._traces:
            t.offered(tools)

    def stage(self, stage: str, start: float, end: float) -> None:
        for t in self._traces:
            t.stage(stage, start, end)

    def llm(
        self,
        stage: str,
        start: float,
        end: float,
        stats: GenerationStats,
        *,
        level: int = 0,
        parse_failures: int = 0,
        first_chunk_s: float | None = None,
    ) -> None:
        for t in self._traces:
            t.llm(
                stage,
                start,
                end,
                stats,
                level=level,
                parse_failures=parse_failures,
                first_chunk_s=first_chunk_s,
            )

    def event(self, event: TurnEvent) -> None:
        for t in self._traces:
            t.event(event)

    def close(self) -> None:
        for t in self._traces:
            t.close()


class Tracers:
    """Several tracers as one (e.g. OpenTelemetry spans and the turn recorder)."""

    def __init__(self, tracers: Sequence[TurnTracer]) -> None:
        self._tracers = list(tracers)

    def begin(self, inp: TurnInput, started: float) -> TurnTrace:
        return Fanout([t.begin(inp, started) for t in self._tracers])
