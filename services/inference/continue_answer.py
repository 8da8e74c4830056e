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

from agentmesh.inference.v1 import inference_pb2 as pb

from services.inference.config import LaneSpec, SamplingDefaults, ToolCallFormat
from services.inference.prompt import ToolDef
from services.inference.tool_calls import (
    CALL_SHAPES,
    GrammarBuilder,
    ParsedCall,
    new_call_id,
    parse_calls,
)
from shared.errors import InvalidArgument

# llama3_json models may open a call with this special token instead of the bare object.
PYTHON_TAG = "<|python_tag|>"


class Path(enum.Enum):
    UNDECIDED = "undecided"
    TEXT = "text"
    CALLS = "calls"


def _openers(fmt: ToolCallFormat) -> tuple[str, ...]:
    if fmt is ToolCallFormat.HERMES:
        return (CALL_SHAPES[fmt].marker,)
    return (CALL_SHAPES[fmt].marker, PYTHON_TAG)


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

    def grammar(self, grammars: GrammarBuilder) -> str:
        """MODE_REQUIRED: 1..max_calls calls only; MODE_AUTO: those calls or a text answer
        that cannot be read as a call."""
        if self.calls_only:
            return grammars.calls(self.tools, self.fmt, 1, self.max_calls)
        return grammars.answer_or_calls(self.tools, self.fmt, self.max_calls)

    def default_max_tokens(self, defaults: SamplingDefaults) -> int:
        """Without a max_tokens override: one call's budget per allowed call, and (auto) at
        least the lane's answer budget."""
        per_calls = defaults.tool_call_max_tokens * self.max_calls
        return per_calls if self.calls_only else max(per_calls, defaults.max_tokens)

    def feed(self, text: str) -> str:
        """One delta in; the text to stream now (possibly empty). A text answer is passed on
        as it comes, not kept: only a (possible) call's text is held for parsing."""
        if self.path is Path.TEXT:
            return text
        self._parts.append(text)
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


def continue_or_answer(
    req: pb.StreamGenerateRequest,
    lane: LaneSpec,
    tools: Sequence[ToolDef],
    grammars: GrammarBuilder,
    default_max_calls: int,
) -> ContinueOrAnswer | None:
    """The splitter of a "continue or answer" stream, or None for a text-only one (mode
    unspecified, or auto without tools); bad combinations are INVALID_ARGUMENT."""
    mode = req.tool_choice.mode
    if mode == pb.ToolChoice.MODE_NAMED:
        raise InvalidArgument(
            "tool_choice.mode", "MODE_NAMED is not supported in StreamGenerate; use CallTools"
        )
    if mode == pb.ToolChoice.MODE_UNSPECIFIED or (mode == pb.ToolChoice.MODE_AUTO and not tools):
        return None
    if mode not in (pb.ToolChoice.MODE_AUTO, pb.ToolChoice.MODE_REQUIRED):
        raise InvalidArgument("tool_choice.mode", "unknown mode")
    if not tools:
        raise InvalidArgument("tools", "MODE_REQUIRED needs at least one tool")
    if req.response_format.json_schema:
        raise InvalidArgument("response_format.json_schema", "cannot be combined with tool_choice")
    fmt = lane.tool_call_format
    grammars.check_tools(tools, fmt)
    max_calls = req.max_calls or default_max_calls
    if fmt is ToolCallFormat.LLAMA3_JSON:
        max_calls = 1  # one call per generation in this format
    return ContinueOrAnswer(tools, fmt, max_calls, calls_only=mode == pb.ToolChoice.MODE_REQUIRED)
