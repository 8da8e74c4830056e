"""Lane runtime: a lane's spec, its (possibly shared) engine, renderer, state and capacity."""

from __future__ import annotations

import enum
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from services.inference.config import LaneSpec
from services.inference.engine import Engine
from services.inference.prompt import PromptRenderer
from shared.errors import ResourceExhausted, Unavailable


class LaneStatus(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    FAILED = "failed"


@dataclass
class Lane:
    spec: LaneSpec
    engine: Engine
    renderer: PromptRenderer
    status: LaneStatus = LaneStatus.STARTING
    in_flight: int = 0
    # Smoothed seconds per request: the retry-after hint when the lane is full.
    _avg_s: float = field(default=1.0)

    @property
    def name(self) -> str:
        return self.spec.name

    def check_serving(self) -> None:
        if self.status is LaneStatus.SERVING and self.engine.errored:
            self.status = LaneStatus.FAILED
        if self.status is LaneStatus.STARTING:
            raise Unavailable(f"lane {self.name!r} is still starting", reason="LANE_STARTING")
        if self.status is LaneStatus.FAILED:
            raise Unavailable(f"lane {self.name!r} is not serving", reason="LANE_FAILED")

    def retry_after_s(self) -> float:
        # Half a typical request: by then one slot has likely freed up.
        return max(0.1, round(self._avg_s / 2, 3))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Take one of the lane's slots or fail at once (no unbounded queue)."""
        self.check_serving()
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
