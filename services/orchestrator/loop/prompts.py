"""Prompt pieces of each stage. The system prompt and the tool registry come first and never
change (prefix cache); stage instructions go at the end of the message list."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.orchestrator.loop.types import Message, Role, ToolDef


def plan_schema(tool_names: Sequence[str], max_tools: int) -> str:
    """The plan's JSON schema: tools first (so a cut-off plan still names them), then done,
    then a short reasoning."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "tools": {
                "type": "array",
                "items": {"type": "string", "enum": list(tool_names)},
                "maxItems": max(1, max_tools),
            },
            "done": {"type": "boolean"},
            "reasoning": {"type": "string"},
        },
        "required": ["tools", "done", "reasoning"],
        "additionalProperties": False,
    }
    return json.dumps(schema, separators=(",", ":"))


def plan_instruction(tool_names: Sequence[str], max_tools: int, round_no: int) -> Message:
    after = "" if round_no == 1 else " The tool results above are what earlier calls returned."
    return Message(
        Role.SYSTEM,
        f"Plan step {round_no}.{after} Choose the tools to call now (at most {max_tools}) from "
        f"{', '.join(tool_names)}; set done to true when you can already answer. "
        'Reply with JSON only: {"tools": [...], "done": true|false, "reasoning": "..."}.',
    )


def tool_call_instruction(names: Sequence[str], customer_id: str = "") -> Message:
    """Last message before emission. Parallel emission runs one generation per tool, so no
    call sees a sibling's arguments: the facts every call needs are repeated here, next to
    where the model writes them."""
    about = f" The customer is {customer_id}." if customer_id else ""
    return Message(
        Role.SYSTEM,
        f"Call {', '.join(names)} now with arguments taken from the conversation.{about}",
    )


def reprompt_with_schema(failures: dict[str, str], tools: dict[str, ToolDef]) -> Message:
    """The failure ladder's first rung: the explicit schema in the prompt, not a blind retry."""
    lines = ["Your previous tool call was invalid. Call the tool again, exactly as specified."]
    for name, reason in failures.items():
        tool = tools.get(name)
        schema = tool.parameters_json_schema if tool is not None else "{}"
        lines.append(
            f"- {name}: {reason}. Its arguments must be one JSON object matching this "
            f"JSON schema exactly: {schema}"
        )
    return Message(Role.SYSTEM, "\n".join(lines))


def customer_context(customer_id: str) -> Message | None:
    if not customer_id:
        return None
    return Message(Role.SYSTEM, f"This conversation is about customer {customer_id}.")


def compose_instruction(notes: Sequence[str]) -> Message:
    text = "Write the reply to the customer now, using the tool results above. Be brief."
    if notes:
        text += " Some things could not be done: " + "; ".join(notes) + ". Say so plainly."
    return Message(Role.SYSTEM, text)


@dataclass(frozen=True)
class ParsedPlan:
    tools: tuple[str, ...]
    done: bool
    reasoning: str
    parsed: bool


_TOOLS_RE = re.compile(r'"tools"\s*:\s*\[([^\]]*)')
_DONE_RE = re.compile(r'"done"\s*:\s*(true|false)')
_NAME_RE = re.compile(r'"([A-Za-z0-9_.-]+)"')


def parse_plan(text: str, known: Sequence[str]) -> ParsedPlan:
    """The plan as decoded; a plan cut off by max_tokens is salvaged field by field."""
    known_set = set(known)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        raw_tools = data.get("tools", [])
        names = [n for n in raw_tools if isinstance(n, str)] if isinstance(raw_tools, list) else []
        return ParsedPlan(
            tools=tuple(dict.fromkeys(n for n in names if n in known_set)),
            done=bool(data.get("done", False)),
            reasoning=str(data.get("reasoning", "")).strip(),
            parsed=True,
        )
    tools_match = _TOOLS_RE.search(text)
    names = _NAME_RE.findall(tools_match.group(1)) if tools_match else []
    done_match = _DONE_RE.search(text)
    return ParsedPlan(
        tools=tuple(dict.fromkeys(n for n in names if n in known_set)),
        done=bool(done_match and done_match.group(1) == "true"),
        reasoning=text.strip()[:300],
        parsed=False,
    )
