"""Turn records: one JSON object per line, what replay needs to re-run a turn and score it.

    {"id", "session_id", "turn_index", "customer_id", "history": [message...], "message",
     "tools_offered": [name...], "calls": [{"name", "arguments", "status", "result_json"}],
     "answer", "lane", "lanes": [...], "latency_s", "outcome", "parse_failures",
     "expected": [{"name", "arguments"}] | null, "tags": [...], "note"}

``calls`` are the calls the recorded turn made (its tool results are what replay feeds back);
``expected`` is a hand-written label (the gold set): when present it is what replay scores
against, else the recorded calls are. ``expected: []`` marks a turn that needs no tool.
Expected arguments name only what the turn determines (principal-bound ones such as
``customer_id`` are filled by the orchestrator, never by the model).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.orchestrator.loop.types import Message
from shared.redaction import redact, redact_value


@dataclass
class RecordedCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    status: str = ""
    result_json: str = ""


@dataclass
class ExpectedCall:
    name: str
    # Only the arguments the turn determines; None: the name alone is scored.
    arguments: dict[str, Any] | None = None


@dataclass
class TurnRecord:
    id: str
    message: str
    session_id: str = ""
    turn_index: int = 1
    customer_id: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    tools_offered: list[str] = field(default_factory=list)
    calls: list[RecordedCall] = field(default_factory=list)
    answer: str = ""
    lane: str = ""
    lanes: list[str] = field(default_factory=list)
    latency_s: float = 0.0
    outcome: str = ""
    parse_failures: int = 0
    expected: list[ExpectedCall] | None = None
    tags: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def reference(self) -> list[ExpectedCall]:
        """What a replay of this turn is scored against."""
        if self.expected is not None:
            return self.expected
        return [ExpectedCall(c.name, c.arguments) for c in self.calls]

    def history_messages(self) -> tuple[Message, ...]:
        return tuple(Message.from_dict(m) for m in self.history)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurnRecord:
        data = dict(data)
        calls = [RecordedCall(**c) for c in data.pop("calls", [])]
        expected_raw = data.pop("expected", None)
        expected = None if expected_raw is None else [ExpectedCall(**e) for e in expected_raw]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(calls=calls, expected=expected, **known)

    def redacted(self) -> TurnRecord:
        """E-mail addresses, phone and card numbers out of every text and argument."""
        return TurnRecord.from_dict(
            {
                **redact_value(self.to_dict()),
                "id": self.id,
                "session_id": self.session_id,
                "customer_id": self.customer_id,
            }
        )


def read_records(path: Path) -> list[TurnRecord]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(TurnRecord.from_dict(json.loads(line)))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}:{number}: not a turn record ({exc})") from None
    return records


def write_records(path: Path, records: Iterable[TurnRecord]) -> None:
    path.write_text(
        "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records),
        encoding="utf-8",
    )


def append_record(path: Path, record: TurnRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")


def unfence(content: str) -> str:
    """The body of a ``<tool_result ...>`` fence as the loop wrote it (the text if none)."""
    if content.startswith("<tool_result") and content.endswith("</tool_result>"):
        start = content.find("\n")
        end = content.rfind("\n</tool_result>")
        if 0 <= start < end:
            return content[start + 1 : end]
    return content


__all__ = [
    "ExpectedCall",
    "RecordedCall",
    "TurnRecord",
    "append_record",
    "read_records",
    "redact",
    "unfence",
    "write_records",
]
