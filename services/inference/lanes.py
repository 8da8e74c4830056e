"""Lane runtime: a lane's spec, its (possibly shared) engine, renderer, state and capacity."""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from services.inference.config import LaneSpec
from services.inference.engine import Engine
from services.inference.prompt import PromptRenderer
from shared.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

LaneStateSink = Callable[[str, bool, bool], Awaitable[None]]
"""(lane name, lane serving?, any lane serving?) -> None: the health names follow the lanes."""

EngineDeathHook = Callable[[str], None]
"""(engine id) -> None: called once when an engine that served dies (the service exits)."""


class LaneStatus(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    FAILED = "failed"


# vLLM's max_num_seqs when the engine arguments don't say (its scheduler default).
DEFAULT_MAX_NUM_SEQS = 256


@dataclass
class SequenceBudget:
    """One engine's sequences, shared by every lane on it: never above its ``max_num_seqs``,
    so nothing queues invisibly inside vLLM. A request reserves every generation it may run
    at once (CallTools its N+1) or is refused with a retry hint from the measured drain rate
    (sequences finished per second over the recent window)."""

    engine_id: str
    capacity: int
    in_use: int = 0
    # Finish times of recent sequences (the drain rate's window).
    _finished: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    # Smoothed seconds a sequence holds its place (the hint before any drain was measured).
    _avg_hold_s: float = 1.0
    # Recent refusals (time, sequences): callers that will come back, ahead of a new one.
    _refused: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))

    def drain_rate(self, now: float | None = None) -> float:
        """Sequences finished per second lately (0 when not measured yet)."""
        now = time.monotonic() if now is None else now
        if len(self._finished) < 2:
            return 0.0
        span = now - self._finished[0]
        return (len(self._finished) - 1) / span if span > 0 else 0.0

    def waiting(self, now: float, window_s: float = 2.0) -> int:
        """Sequences refused in the last ``window_s``: their callers retry before a new one."""
        while self._refused and self._refused[0][0] < now - window_s:
            self._refused.popleft()
        return sum(n for _, n in self._refused)

    def retry_after_s(self, need: int) -> float:
        """Seconds until the engine has likely drained enough for ``need`` more sequences,
        counting the callers refused just before (so retries spread out, not stampede)."""
        now = time.monotonic()
        short = max(1, self.in_use + need - self.capacity) + self.waiting(now)
        rate = self.drain_rate(now)
        if rate <= 0 and self.in_use:
            # Little's law: in_use sequences each held for about _avg_hold_s.
            rate = self.in_use / max(self._avg_hold_s, 0.01)
        wait = short / rate if rate > 0 else self._avg_hold_s
        return round(min(30.0, max(0.05, wait)), 3)

    @asynccontextmanager
    async def reserve(self, sequences: int, lane: str) -> AsyncIterator[None]:
        need = max(1, min(sequences, self.capacity))
        if self.in_use + need > self.capacity:
            hint = self.retry_after_s(need)
            self._refused.append((time.monotonic(), need))
            raise ResourceExhausted(
                f"engine {self.engine_id} is at its sequence budget ({self.capacity})",
                retry_after_s=hint,
                reason="ENGINE_AT_CAPACITY",
                metadata={"lane": lane, "engine": self.engine_id, "sequences": str(need)},
            )
        self.in_use += need
        started = time.monotonic()
        try:
            yield
        finally:
            self.in_use -= need
            now = time.monotonic()
            self._avg_hold_s = 0.8 * self._avg_hold_s + 0.2 * (now - started)
            self._finished.extend([now] * need)


def engine_sequence_cap(engine_args: Mapping[str, object]) -> int:
    value = engine_args.get("max_num_seqs")
    return int(value) if isinstance(value, int | str) and int(value) > 0 else DEFAULT_MAX_NUM_SEQS


@dataclass
class Lane:
    spec: LaneSpec
    engine: Engine
    renderer: PromptRenderer
    budget: SequenceBudget
    status: LaneStatus = LaneStatus.STARTING
    in_flight: int = 0
    # Smoothed seconds per request: the retry-after hint when the lane is full.
    _avg_s: float = field(default=1.0)

    @property
    def name(self) -> str:
        return self.spec.name

    def raise_unless_serving(self) -> None:
        if self.status is LaneStatus.STARTING:
            raise Unavailable(f"lane {self.name!r} is still starting", reason="LANE_STARTING")
        if self.status is LaneStatus.FAILED:
            raise Unavailable(f"lane {self.name!r} is not serving", reason="LANE_FAILED")

    def retry_after_s(self) -> float:
        # Half a typical request: by then one slot has likely freed up.
        return max(0.1, round(self._avg_s / 2, 3))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Take one of the lane's slots or fail at once (no unbounded queue); the caller checked
        that the lane serves (:meth:`LaneBoard.require_serving`)."""
        if self.in_flight >= self.spec.max_concurrency:
            raise ResourceExhausted(
                f"lane {self.name!r} is at its concurrency cap ({self.spec.max_concurrency})",
                retry_after_s=self.retry_after_s(),
                reason="LANE_AT_CAPACITY",
                metadata={"lane": self.name},
            )
        self.in_flight += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._avg_s = 0.8 * self._avg_s + 0.2 * (time.monotonic() - started)


class LaneBoard:
    """The one place lane state changes. Every change also reaches the health sink (the lane's
    name and the service's overall status), so health never says SERVING over a dead engine,
    whoever notices the death first: a request, the watch tick or a failed generation."""

    def __init__(self, lanes: Mapping[str, Lane]) -> None:
        self.lanes = lanes
        self._sink: LaneStateSink | None = None
        self._on_engine_death: EngineDeathHook | None = None
        self.dead_engines: set[str] = set()

    def bind(self, sink: LaneStateSink | None, on_engine_death: EngineDeathHook | None) -> None:
        self._sink = sink
        self._on_engine_death = on_engine_death

    def any_serving(self) -> bool:
        return any(lane.status is LaneStatus.SERVING for lane in self.lanes.values())

    async def set_status(self, lane: Lane, status: LaneStatus) -> None:
        lane.status = status
        if self._sink is not None:
            await self._sink(lane.name, status is LaneStatus.SERVING, self.any_serving())

    async def engine_state(self, engine: Engine, status: LaneStatus) -> None:
        """Every lane of ``engine`` to ``status`` (start results)."""
        for lane in self.lanes.values():
            if lane.engine is engine:
                await self.set_status(lane, status)

    async def engine_died(self, engine: Engine) -> None:
        """Fail the engine's lanes (idempotent); the death hook runs once per engine."""
        for lane in self.lanes.values():
            if lane.engine is engine and lane.status is not LaneStatus.FAILED:
                log.error("engine %s of lane %s died", engine.engine_id, lane.name)
                await self.set_status(lane, LaneStatus.FAILED)
        if engine.engine_id not in self.dead_engines:
            self.dead_engines.add(engine.engine_id)
            if self._on_engine_death is not None:
                self._on_engine_death(engine.engine_id)

    async def require_serving(self, lane: Lane) -> None:
        """Raise UNAVAILABLE unless ``lane`` serves; a dead engine found here is recorded
        (lanes and health) before the caller hears of it."""
        if lane.status is LaneStatus.SERVING and lane.engine.errored:
            await self.engine_died(lane.engine)
        lane.raise_unless_serving()

    async def sweep(self) -> None:
        """The watch tick: record every engine that died while serving."""
        engines = {id(lane.engine): lane.engine for lane in self.lanes.values()}
        for engine in engines.values():
            serving = any(
                lane.engine is engine and lane.status is LaneStatus.SERVING
                for lane in self.lanes.values()
            )
            if serving and engine.errored:
                await self.engine_died(engine)
