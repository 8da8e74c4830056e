"""Tool-call grammars (xgrammar EBNF) per native format, and parsing of what was generated.

Grammars make calls valid by construction: the tool name is a constant per alternative and the
arguments follow the tool's JSON schema, in compact JSON (fewer tokens per call). Every call is
still parsed and validated with jsonschema afterwards: the unconstrained mode needs it, and it
keeps the constrained path honest.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jsonschema

from services.inference.config import ToolCallFormat
from services.inference.prompt import ToolDef
from shared.errors import InvalidArgument

COMPACT = (",", ":")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedMemo(Generic[K, V]):
    """Values memoized by key, at most ``max_entries`` of them (least recently used go)."""

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._max = max_entries

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class CallShape:
    """How one call is written in a format: ``wrap_open``, the compact JSON object
    ``{"name":"<tool>","<args_key>":{...}}``, ``wrap_close``."""

    args_key: str
    # What a call opens with (llama3_json: after optional whitespace).
    marker: str
    wrap_open: str = ""
    wrap_close: str = ""

    def opener(self, name: str) -> str:
        """Everything before the arguments object: fixed once the tool is named (prefilled)."""
        return f'{self.wrap_open}{{"name":{json.dumps(name)},"{self.args_key}":'

    @property
    def closer(self) -> str:
        """Everything after the arguments object."""
        return "}" + self.wrap_close


CALL_SHAPES = {
    ToolCallFormat.HERMES: CallShape(
        "arguments", "<tool_call>", wrap_open="<tool_call>\n", wrap_close="\n</tool_call>"
    ),
    ToolCallFormat.LLAMA3_JSON: CallShape("parameters", "{"),
}
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _xg() -> Any:
    import xgrammar

    return xgrammar


def ebnf_literal(text: str) -> str:
    """``text`` as an EBNF string literal."""
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def call_object_schema(tool: ToolDef, fmt: ToolCallFormat) -> dict[str, Any]:
    """Schema of one call object in the lane's format: name first, then its arguments."""
    key = CALL_SHAPES[fmt].args_key
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, key: tool.parameters},
        "required": ["name", key],
        "additionalProperties": False,
    }


def json_schema_grammar(schema: dict[str, Any], field: str, what: str) -> Any:
    """Compact-JSON grammar of ``schema``; an unsupported schema is INVALID_ARGUMENT."""
    try:
        return _xg().Grammar.from_json_schema(
            json.dumps(schema), any_whitespace=False, separators=COMPACT
        )
    except (RuntimeError, ValueError, TypeError):
        raise InvalidArgument(
            field, f"{what}: JSON schema cannot be turned into a grammar"
        ) from None


class GrammarBuilder:
    """Builds and memoizes grammars (tool registries are immutable per process, so the same
    strings recur and vLLM's own grammar cache hits too)."""

    def __init__(self, max_entries: int = 256) -> None:
        self._built: BoundedMemo[str, str] = BoundedMemo(max_entries)

    def _memo(self, key: str, build: Any) -> str:
        value = self._built.get(key)
        if value is None:
            value = str(build())
            self._built.put(key, value)
        return value

    def check_tools(self, tools: Sequence[ToolDef], fmt: ToolCallFormat) -> None:
        """Fail fast, naming the tool, when a schema cannot be compiled."""
        for i, tool in enumerate(tools):
            self._memo(
                _key("call", fmt, [tool]),
                lambda tool=tool, i=i: self._one_call(tool, fmt, f"tools[{i}]"),
            )

    def _one_call(self, tool: ToolDef, fmt: ToolCallFormat, field: str = "tools") -> Any:
        shape = CALL_SHAPES[fmt]
        body = json_schema_grammar(
            call_object_schema(tool, fmt), f"{field}.parameters_json_schema", f"tool {tool.name!r}"
        )
        return _wrapped(shape.wrap_open, body, shape.wrap_close)

    def _any_call(self, tools: Sequence[ToolDef], fmt: ToolCallFormat) -> Any:
        xg = _xg()
        parts = [self._one_call(t, fmt) for t in tools]
        return parts[0] if len(parts) == 1 else xg.Grammar.union(*parts)

    def _free_text(self, fmt: ToolCallFormat) -> Any:
        # Auto mode: an answer that does not start like a call is also allowed.
        first = CALL_SHAPES[fmt].marker[0]
        return _xg().Grammar.from_ebnf(f'root ::= "" | [^{first}] [^]*')

    def answer_or_calls(self, tools: Sequence[ToolDef], fmt: ToolCallFormat, max_calls: int) -> str:
        """ "Continue or answer": either 1..``max_calls`` valid calls (llama3_json: one) or a
        text answer that cannot be read as a call (hermes: it never contains the
        ``<tool_call>`` opener; llama3_json: it does not open with a JSON object)."""
        return self._memo(
            _key(f"answer-or-calls{max_calls}", fmt, tools),
            lambda: self._calls_grammar(tools, fmt, 1, max_calls, text=answer_text_grammar(fmt)),
        )

    def single_tool(self, tool: ToolDef, fmt: ToolCallFormat) -> str:
        """Exactly one call of ``tool`` (parallel emission: one of these per generation)."""
        return self._memo(_key("call", fmt, [tool]), lambda: self._one_call(tool, fmt))

    def arguments(self, tool: ToolDef, fmt: ToolCallFormat) -> str:
        """The rest of one call of ``tool`` after its prefilled opener
        (:meth:`CallShape.opener`): the arguments object under the tool's schema, then the
        format's closer. Opener + this output is exactly what :meth:`single_tool` allows."""

        def build() -> Any:
            body = json_schema_grammar(
                tool.parameters, "tools.parameters_json_schema", f"tool {tool.name!r}"
            )
            return _wrapped("", body, CALL_SHAPES[fmt].closer)

        return self._memo(_key("args", fmt, [tool]), build)

    def sequence(self, tools: Sequence[ToolDef], fmt: ToolCallFormat) -> str:
        """Exactly these calls, in this order, in one generation (hermes only)."""
        xg = _xg()

        def build() -> Any:
            parts: list[Any] = []
            for i, tool in enumerate(tools):
                if i:
                    parts.append(xg.Grammar.from_ebnf('root ::= "\\n"'))
                parts.append(self._one_call(tool, fmt))
            return parts[0] if len(parts) == 1 else xg.Grammar.concat(*parts)

        return self._memo(_key("seq", fmt, tools), build)

    def calls(
        self, tools: Sequence[ToolDef], fmt: ToolCallFormat, min_calls: int, max_calls: int
    ) -> str:
        """``min_calls``..``max_calls`` calls of any of ``tools`` in one generation; with
        ``min_calls == 0`` plain text is allowed instead. llama3_json: at most one call."""
        text = self._free_text(fmt) if min_calls == 0 else None
        return self._memo(
            _key(f"calls{min_calls}-{max_calls}", fmt, tools),
            lambda: self._calls_grammar(tools, fmt, min_calls, max_calls, text=text),
        )

    def _calls_grammar(
        self,
        tools: Sequence[ToolDef],
        fmt: ToolCallFormat,
        min_calls: int,
        max_calls: int,
        *,
        text: Any = None,
    ) -> Any:
        """max(1, min_calls)..max_calls calls (llama3_json: one), or ``text`` instead."""
        if fmt is ToolCallFormat.LLAMA3_JSON:
            max_calls = 1
        xg = _xg()
        item = self._any_call(tools, fmt)
        sep = xg.Grammar.from_ebnf('root ::= "\\n"')
        options: list[Any] = []
        for count in range(max(min_calls, 1), max_calls + 1):
            seq: list[Any] = []
            for i in range(count):
                if i:
                    seq.append(sep)
                seq.append(item)
            options.append(seq[0] if len(seq) == 1 else xg.Grammar.concat(*seq))
        if text is not None:
            options.append(text)
        return options[0] if len(options) == 1 else xg.Grammar.union(*options)

    def selection(self, tools: Sequence[ToolDef], min_calls: int, max_calls: int) -> str:
        """A compact JSON array of tool names: which tools to call (parallel emission)."""
        names = " | ".join(ebnf_literal(json.dumps(t.name)) for t in tools)
        more = f' ("," name){{0,{max_calls - 1}}}' if max_calls > 1 else ""
        body = f'"[" name{more} "]"'
        if min_calls == 0:
            body = f'"[]" | {body}'

        def build() -> Any:
            return _xg().Grammar.from_ebnf(f"root ::= {body}\nname ::= {names}")

        return self._memo(_key(f"sel{min_calls}-{max_calls}", ToolCallFormat.HERMES, tools), build)


def _wrapped(before: str, body: Any, after: str) -> Any:
    """``body`` between two literals (either may be empty)."""
    xg = _xg()
    items = [body]
    if before:
        items.insert(0, xg.Grammar.from_ebnf(f"root ::= {ebnf_literal(before)}"))
    if after:
        items.append(xg.Grammar.from_ebnf(f"root ::= {ebnf_literal(after)}"))
    return items[0] if len(items) == 1 else xg.Grammar.concat(*items)


def _char_class_item(ch: str) -> str:
    return "\\" + ch if ch in "]\\^-[" else ebnf_literal(ch)[1:-1]


def text_without_ebnf(pattern: str) -> str:
    """EBNF of every string that does not contain ``pattern`` (whose first character must
    not occur again in it, so a failed partial match can only restart at that character).

    A string avoids the pattern when each run of partial matches ends in a deviating
    character: ``unit ::= [^p0] | partial* deviation``, and the string may end inside one.
    """
    first, rest = pattern[0], pattern[1:]
    if not rest or first in rest:
        raise ValueError("pattern must be 2+ characters whose first one does not recur")
    prefixes = [pattern[:i] for i in range(1, len(pattern))]
    partial = " | ".join(ebnf_literal(p) for p in prefixes)
    deviations = " | ".join(
        f"{ebnf_literal(p)} [^{_char_class_item(first)}{_char_class_item(pattern[len(p)])}]"
        for p in prefixes
    )
    return "\n".join(
        [
            "root ::= unit* partial*",
            f"unit ::= [^{_char_class_item(first)}] | partial* deviation",
            f"partial ::= {partial}",
            f"deviation ::= {deviations}",
        ]
    )


def answer_text_grammar(fmt: ToolCallFormat) -> Any:
    """A text answer that cannot be mistaken for the format's tool call."""
    if fmt is ToolCallFormat.HERMES:
        return _xg().Grammar.from_ebnf(text_without_ebnf(CALL_SHAPES[fmt].marker))
    return _xg().Grammar.from_ebnf("root ::= [ \\t\\r\\n]* ([^{ \\t\\r\\n] [^]*)?")


def _key(kind: str, fmt: ToolCallFormat, tools: Sequence[ToolDef]) -> str:
    spec = [[t.name, t.parameters] for t in tools]
    return f"{kind}|{fmt.value}|{json.dumps(spec, sort_keys=True, separators=COMPACT)}"


@dataclass
class ParsedCall:
    """One call as parsed from generated text."""

    id: str
    name: str
    arguments_json: str
    ok: bool
    error: str
    raw_text: str


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


def _check_call(
    obj: Any, raw: str, tools: dict[str, ToolDef], fmt: ToolCallFormat, expected: str | None
) -> ParsedCall:
    call_id = new_call_id()
    if not isinstance(obj, dict):
        return ParsedCall(call_id, "", "", False, "tool call is not a JSON object", raw)
    name = obj.get("name")
    args = obj.get(CALL_SHAPES[fmt].args_key, obj.get("arguments", obj.get("parameters")))
    if not isinstance(name, str):
        return ParsedCall(call_id, "", "", False, "tool call has no name", raw)
    args_json = json.dumps(args, separators=COMPACT, ensure_ascii=False) if args is not None else ""
    if expected is not None and name != expected:
        return ParsedCall(call_id, name, args_json, False, f"expected a call of {expected!r}", raw)
    tool = tools.get(name)
    if tool is None:
        return ParsedCall(call_id, name, args_json, False, f"unknown tool {name!r}", raw)
    if not isinstance(args, dict):
        return ParsedCall(call_id, name, args_json, False, "arguments are not a JSON object", raw)
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(tool.parameters).iter_errors(args)
    )
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return ParsedCall(
            call_id, name, args_json, False, f"arguments do not match the schema at {where}", raw
        )
    return ParsedCall(call_id, name, args_json, True, "", raw)


def parse_calls(
    text: str,
    tools: Sequence[ToolDef],
    fmt: ToolCallFormat,
    *,
    expected: str | None = None,
) -> list[ParsedCall]:
    """All tool calls in ``text`` (native format), each with its own outcome."""
    by_name = {t.name: t for t in tools}
    out: list[ParsedCall] = []
    if fmt is ToolCallFormat.HERMES:
        for match in _HERMES_BLOCK.finditer(text):
            raw = match.group(0)
            try:
                obj = json.loads(match.group(1))
            except ValueError:
                out.append(ParsedCall(new_call_id(), "", "", False, "call is not valid JSON", raw))
                continue
            out.append(_check_call(obj, raw, by_name, fmt, expected))
        return out
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :]
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(body):
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
        if pos >= len(body):
            break
        if body[pos] != "{":
            if not out:
                return []  # plain text answer: no call
            out.append(ParsedCall(new_call_id(), "", "", False, "text after the call", body[pos:]))
            break
        try:
            obj, end = decoder.raw_decode(body, pos)
        except ValueError:
            out.append(
                ParsedCall(new_call_id(), "", "", False, "call is not valid JSON", body[pos:])
            )
            break
        out.append(_check_call(obj, body[pos:end], by_name, fmt, expected))
        pos = end
    return out


def parse_selection(text: str, tools: Sequence[ToolDef], max_calls: int) -> list[str] | None:
    """Tool names from a selection generation (known names only, capped); None if unreadable."""
    try:
        names = json.loads(text)
    except ValueError:
        return None
    if not isinstance(names, list):
        return None
    known = {t.name for t in tools}
    return [n for n in names if isinstance(n, str) and n in known][:max_calls]
