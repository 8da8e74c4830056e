"""Lane selection: a named lane, or automatic by stage and escalation level.

Automatic selection picks, among the lanes this process hosts (in preset order), the first
whose ``escalation_level`` equals the requested one (0 workhorse, 1 planner, 2 heavy; higher
levels clamp to the highest configured) and whose ``stages`` include the request's stage.
When no hosted lane has that level, the nearest lower level serves and the reason says so.
Lanes without an ``escalation_level`` (``speed`` in the shipped presets) are never chosen
automatically: a caller names them for latency-first work (classification, sub-agents, short
tool-call stages where strict grammars make up for the smaller model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.inference.config import LaneSpec, StageName
from shared.errors import NotFound

LEVEL_NAMES = {0: "workhorse", 1: "planner", 2: "heavy"}


@dataclass(frozen=True)
class RouteChoice:
    lane: LaneSpec
    reason: str


class LaneRouter:
    def __init__(self, hosted: Sequence[LaneSpec], all_lanes: Sequence[LaneSpec] = ()) -> None:
        self._hosted = list(hosted)
        self._by_name = {lane.name: lane for lane in self._hosted}
        self._elsewhere = {lane.name for lane in all_lanes} - set(self._by_name)

    def choose(self, lane: str, stage: StageName | None, escalation_level: int) -> RouteChoice:
        if lane:
            found = self._by_name.get(lane)
            if found is None:
                if lane in self._elsewhere:
                    raise NotFound(
                        f"lane {lane!r} is not hosted by this instance "
                        f"(hosted: {', '.join(self._by_name)})",
                        reason="LANE_NOT_HOSTED",
                        metadata={"lane": lane},
                    )
                raise NotFound(
                    f"unknown lane {lane!r} (hosted: {', '.join(self._by_name)})",
                    reason="LANE_NOT_FOUND",
                    metadata={"lane": lane},
                )
            return RouteChoice(found, f"lane {lane!r} requested by name")
        return self._automatic(stage, escalation_level)

    def _automatic(self, stage: StageName | None, level: int) -> RouteChoice:
        candidates = [
            lane
            for lane in self._hosted
            if lane.escalation_level is not None and (stage is None or stage in lane.stages)
        ]
        stage_text = f"stage {stage.value}" if stage is not None else "no stage given"
        if not candidates:
            raise NotFound(
                f"no hosted lane serves {stage_text} automatically; name a lane",
                reason="NO_LANE_FOR_STAGE",
            )
        top = max(lane.escalation_level or 0 for lane in candidates)
        wanted = min(level, top)
        clamp = f" (level {level} clamped to {top})" if level > top else ""
        for probe in range(wanted, -1, -1):
            for lane in candidates:
                if lane.escalation_level == probe:
                    if probe == wanted:
                        reason = (
                            f"automatic: {stage_text}, escalation level {wanted} "
                            f"({LEVEL_NAMES.get(wanted, 'custom')}){clamp} -> {lane.name}"
                        )
                    else:
                        reason = (
                            f"automatic: {stage_text}, escalation level {wanted} has no "
                            f"hosted lane; fell back to level {probe} -> {lane.name}"
                        )
                    return RouteChoice(lane, reason)
        raise NotFound(
            f"no hosted lane at or below escalation level {wanted} serves {stage_text}",
            reason="NO_LANE_FOR_LEVEL",
        )
