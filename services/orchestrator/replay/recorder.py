"""Records turns as they run (a TurnTracer): one redacted TurnRecord per finished turn,
appended to a JSON-lines file. Opt-in (``orchestrator.record_turns_path``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.orchestrator.loop import events as ev
from services.orchestrator.loop.state import TurnInput
from services.orchestrator.loop.trace import NoTrace, TurnTrace
from services.orchestrator.loop.types import GenerationStats, Role
from services.orchestrator.replay.records import RecordedCall, TurnRecord, append_record, unfence


def _args(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_raw": text}


class TurnRecorder:
    """TurnTracer appending each finished turn to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def begin(self, inp: TurnInput, started: float) -> TurnTrace:
        return RecordingTurn(inp, lambda r: append_record(self.path, r.redacted()))


class RecordingTurn(NoTrace):
    """Builds the TurnRecord of one turn from its hooks and events."""

    def __init__(self, inp: TurnInput, sink: Any) -> None:
        self._sink = sink
        self.record = TurnRecord(
            id=inp.turn_id,
            message=inp.user_message,
            session_id=inp.session_id,
            turn_index=inp.turn_index,
            customer_id=inp.customer_id,
            history=[m.to_dict() for m in inp.history],
            lane=inp.forced_lane,
        )
        self._by_id: dict[str, RecordedCall] = {}
        self.emitted = 0

    def offered(self, tools: Sequence[str]) -> None:
        self.record.tools_offered = list(tools)

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
        if stats.lane and stats.lane not in self.record.lanes:
            self.record.lanes.append(stats.lane)
        self.record.parse_failures += parse_failures

    def event(self, event: ev.TurnEvent) -> None:
        rec = self.record
        if isinstance(event, ev.ToolCallFinished):
            call = RecordedCall(event.name, _args(event.arguments_json), event.status)
            rec.calls.append(call)
            if event.call_id:
                self._by_id[event.call_id] = call
        elif isinstance(event, ev.MessagesCommitted):
            for m in event.messages:
                if m.role is Role.TOOL and m.tool_call_id in self._by_id:
                    self._by_id[m.tool_call_id].result_json = unfence(m.content)
        elif isinstance(event, ev.TurnCompleted):
            rec.answer = event.answer
            rec.latency_s = event.latency.total
            rec.outcome = event.outcome.value
            if not rec.lane and rec.lanes:
                rec.lane = rec.lanes[0]
            self._sink(rec)
