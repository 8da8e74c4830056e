"""Re-runs recorded turns against a lane with the recorded tool results fed back, and scores
them (replay/scoring.py)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.orchestrator.loop import events as ev
from services.orchestrator.loop.policy import AgentProfile, Caps
from services.orchestrator.loop.ports import InferencePort
from services.orchestrator.loop.runner import TurnRunner
from services.orchestrator.loop.state import TurnInput
from services.orchestrator.loop.trace import TurnTrace
from services.orchestrator.loop.types import ToolDef
from services.orchestrator.replay.recorder import RecordingTurn
from services.orchestrator.replay.records import TurnRecord
from services.orchestrator.replay.scoring import MadeCall, Score
from services.orchestrator.replay.tools import RecordedTools

# Made calls: every call the model formed (run, proposed, refused, skipped), and writes it
# chose that the policy declined before any arguments were written. Not: emissions that
# never parsed (they count as parse failures).
NOT_MADE = {"INVALID_ARGUMENT"}


def made_calls(events: Sequence[ev.TurnEvent]) -> list[MadeCall]:
    made = []
    for e in events:
        if not isinstance(e, ev.ToolCallFinished) or e.status in NOT_MADE:
            continue
        if not e.call_id and e.status != "DECLINED":
            continue
        try:
            args = json.loads(e.arguments_json or "{}")
        except ValueError:
            args = {}
        made.append(MadeCall(e.name, args if isinstance(args, dict) else {}))
    return made


@dataclass
class TurnResult:
    id: str
    expected: list[dict[str, Any]]
    made: list[dict[str, Any]]
    name_hits: int
    argument_hits: int
    latency_s: float
    parse_failures: int
    outcome: str
    lanes: list[str] = field(default_factory=list)
    answer: str = ""
    error: str = ""


@dataclass
class ReplayReport:
    lane: str
    score: Score
    turns: list[TurnResult]

    @property
    def f1(self) -> float:
        return self.score.f1

    def to_dict(self) -> dict[str, Any]:
        latencies = sorted(t.latency_s for t in self.turns) or [0.0]
        parse_failures = sum(t.parse_failures for t in self.turns)
        formed = sum(len(t.made) for t in self.turns)
        p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
        return {
            "lane": self.lane or "auto",
            "turns": len(self.turns),
            "scores": self.score.row(),
            "f1": round(self.f1, 4),
            "parse_failure_rate": round(parse_failures / (parse_failures + formed), 4)
            if parse_failures + formed
            else 0.0,
            "parse_failures": parse_failures,
            "errors": sum(1 for t in self.turns if t.error),
            "latency_s": {
                "mean": round(statistics.fmean(latencies), 3),
                "p50": round(statistics.median(latencies), 3),
                "p95": round(p95, 3),
                "max": round(latencies[-1], 3),
            },
            "per_turn": [t.__dict__ for t in self.turns],
        }


class _Collect:
    """Observes a replayed turn (its parse failures, lanes) without writing anything."""

    def __init__(self) -> None:
        self.turn: RecordingTurn | None = None

    def begin(self, inp: TurnInput, started: float) -> TurnTrace:
        self.turn = RecordingTurn(inp, lambda record: None)
        return self.turn


async def replay_turn(
    record: TurnRecord,
    inference: InferencePort,
    profile: AgentProfile,
    registry: Sequence[ToolDef],
    *,
    lane: str,
    caps: Caps,
) -> tuple[TurnResult, list[MadeCall]]:
    collect = _Collect()
    runner = TurnRunner(inference, RecordedTools(record.calls, registry), profile, tracer=collect)
    inp = TurnInput(
        session_id=record.session_id or record.id,
        turn_index=record.turn_index,
        history=record.history_messages(),
        user_message=record.message,
        registry=tuple(registry),
        caps=caps,
        customer_id=record.customer_id,
        forced_lane=lane,
    )
    events: list[ev.TurnEvent] = []
    error = ""
    try:
        async for event in runner.run(inp):
            events.append(event)
    except Exception as exc:  # one broken turn must not end the replay
        error = type(exc).__name__
    done = next((e for e in events if isinstance(e, ev.TurnCompleted)), None)
    made = made_calls(events)
    turn = collect.turn
    result = TurnResult(
        id=record.id,
        expected=[{"name": e.name, "arguments": e.arguments} for e in record.reference],
        made=[{"name": m.name, "arguments": dict(m.arguments)} for m in made],
        name_hits=0,
        argument_hits=0,
        latency_s=done.latency.total if done else 0.0,
        parse_failures=turn.record.parse_failures if turn else 0,
        outcome=done.outcome.value if done else "error",
        lanes=list(turn.record.lanes) if turn else [],
        answer=done.answer if done else "",
        error=error,
    )
    return result, made


async def replay(
    records: Sequence[TurnRecord],
    inference: InferencePort,
    profile: AgentProfile,
    registry: Sequence[ToolDef],
    *,
    lane: str = "",
    caps: Caps | None = None,
    on_turn: Callable[[TurnResult], None] | None = None,
) -> ReplayReport:
    """Every record re-run on ``lane`` (empty: automatic lanes), scored against its labels."""
    caps = caps or Caps(turn_budget_s=600, task_budget_s=6000)
    score = Score()
    results = []
    for record in records:
        result, made = await replay_turn(record, inference, profile, registry, lane=lane, caps=caps)
        result.name_hits, result.argument_hits = score.add(record.reference, made)
        results.append(result)
        if on_turn is not None:
            on_turn(result)
    return ReplayReport(lane=lane, score=score, turns=results)


def demo_registry() -> tuple[ToolDef, ...]:
    """The tool service's default registry as the orchestrator sees it (no tools service)."""
    from services.orchestrator.downstream import tool_from_proto
    from services.tools.registry import default_registry
    from services.tools.service import spec_to_pb

    return tuple(tool_from_proto(t) for t in spec_to_pb(default_registry()))
