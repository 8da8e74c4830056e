""" "Continue or answer" in StreamGenerate: one generation that either answers in text
(streamed as it is generated) or calls tools in the lane's native format (never streamed;
parsed, validated and returned as one tool_calls event).

The generation runs under :meth:`GrammarBuilder.answer_or_calls` (MODE_AUTO) or the calls-only
grammar (MODE_REQUIRED), so the first characters decide the path: text that cannot open a call
is forwarded at once; only the few characters that could still be a call opener wait.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.inference.config import ToolCallFormat
from services.inference.prompt import ToolDef
from services.inference.tool_calls import (
    TOOL_CALL_OPENER,
    ParsedCall,
    new_call_id,
    parse_calls,
)

# llama3_json models may open a call with this special token instead of the bare object.
PYTHON_TAG = "<|python_tag|>"


class Path(enum.Enum):
    UNDECIDED = "undecided"
    TEXT = "text"
    CALLS = "calls"


def _openers(fmt: ToolCallFormat) -> tuple[str, ...]:
    if fmt is ToolCallFormat.HERMES:
        return (TOOL_CALL_OPENER[fmt],)
    return (TOOL_CALL_OPENER[fmt], PYTHON_TAG)


@dataclass
class ContinueOrAnswer:
    """Splits one generation's deltas into streamed text or buffered tool calls."""

    tools: Sequence[ToolDef]
    fmt: ToolCallFormat
    max_calls: int
    # MODE_REQUIRED: the output is calls by construction; nothing is ever streamed.
    calls_only: bool = False
    path: Path = Path.UNDECIDED
    _held: str = ""
    _parts: list[str] = field(default_factory=list)

    def feed(self, text: str) -> str:
        """One delta in; the text to stream now (possibly empty)."""
        self._parts.append(text)
        if self.path is Path.TEXT:
            return text
        if self.path is Path.CALLS:
            return ""
        self._held += text
        self.path = self._decide(self._held)
        if self.path is Path.TEXT:
            out, self._held = self._held, ""
            return out
        return ""

    def finish(self) -> str:
        """The generation ended: text still held back (if it turned out to be an answer)."""
        if self.path is Path.UNDECIDED:
            head = self._held.lstrip()
            # A call opener cut short (length, stop string) is a failed call, not an answer.
            self.path = Path.CALLS if head else Path.TEXT
        if self.path is Path.TEXT:
            out, self._held = self._held, ""
            return out
        return ""

    def calls(self) -> list[ParsedCall] | None:
        """The parsed calls when the generation chose to call tools (after :meth:`finish`)."""
        if self.path is not Path.CALLS:
            return None
        text = "".join(self._parts)
        calls = parse_calls(text, self.tools, self.fmt)[: self.max_calls]
        if not calls:
            calls = [ParsedCall(new_call_id(), "", "", False, "no tool call in the output", text)]
        return calls

    def _decide(self, held: str) -> Path:
        if self.calls_only:
            return Path.CALLS
        head = held.lstrip()
        if not head:
            return Path.UNDECIDED
        openers = _openers(self.fmt)
        if any(head.startswith(o) for o in openers):
            return Path.CALLS
        if any(o.startswith(head) for o in openers):
            return Path.UNDECIDED
        return Path.TEXT
