"""A finished turn's recorded events (TurnStarted + TurnCompleted) as JSON, for replay to a
retry with the same request id."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from services.orchestrator.loop.events import (
    LaneUsage,
    Latency,
    Outcome,
    TurnCompleted,
    TurnStarted,
)
from services.orchestrator.loop.types import Usage


def encode_final(started: TurnStarted, completed: TurnCompleted) -> str:
    body = dataclasses.asdict(completed)
    body["outcome"] = completed.outcome.value
    return json.dumps(
        {"started": dataclasses.asdict(started), "completed": body}, separators=(",", ":")
    )


def decode_final(text: str) -> tuple[TurnStarted, TurnCompleted]:
    data: dict[str, Any] = json.loads(text)
    c = data["completed"]
    completed = TurnCompleted(
        turn_id=c["turn_id"],
        answer=c["answer"],
        outcome=Outcome(c["outcome"]),
        usage=tuple(
            LaneUsage(
                lane=u["lane"],
                model=u["model"],
                usage=Usage(**u["usage"]),
                generations=u["generations"],
            )
            for u in c["usage"]
        ),
        latency=Latency(**c["latency"]),
        tool_calls=c["tool_calls"],
        task_tool_calls=c["task_tool_calls"],
        notes=tuple(c["notes"]),
        llm_stages=c["llm_stages"],
    )
    return TurnStarted(**data["started"]), completed
