"""Prompt pieces of each stage. The system prompt and the tool registry come first and never
change (prefix cache); stage instructions go at the end of the message list."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.orchestrator.loop.types import Message, Role, ToolDef


def plan_schema(tool_names: Sequence[str], max_tools: int, intent_max_chars: int) -> str:
    """The plan's JSON schema: the calls first (so a cut-off plan still names them), each with
    a short intent the emission stage reads, then a short reasoning."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "calls": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "tool": {"type": "string", "enum": list(tool_names)},
                        "intent": {"type": "string", "maxLength": intent_max_chars},
                    },
                    "required": ["tool", "intent"],
                    "additionalProperties": False,
                },
                "maxItems": max(1, max_tools),
            },
            "reasoning": {"type": "string", "maxLength": 200},
        },
        "required": ["calls", "reasoning"],
        "additionalProperties": False,
    }
    return json.dumps(schema, separators=(",", ":"))


def plan_instruction(
    tool_names: Sequence[str], max_tools: int, defaults: Sequence[str], signed_in: bool
) -> Message:
    usual = [n for n in defaults if n in tool_names]
    usually = f" Usually that is {', '.join(usual)}." if usual else ""
    who = "" if signed_in else " The customer is not signed in: only help-center search works."
    return Message(
        Role.SYSTEM,
        f"Plan the tools to call for the customer's last message (at most {max_tools}) from "
        f"{', '.join(tool_names)}.{usually} Call none for greetings or thanks; only kb_search "
        f"for how-to questions.{who} Give each call a short intent. Reply with JSON only: "
        '{"calls": [{"tool": "...", "intent": "..."}], "reasoning": "..."}.',
    )


def tool_call_instruction(calls: Sequence[tuple[str, str]]) -> Message:
    """Last message before emission: each call with the plan's intent for it. Parallel
    emission runs one generation per tool, so every call sees the whole plan here."""
    parts = [f"{name} ({intent})" if intent else name for name, intent in calls]
    return Message(
        Role.SYSTEM,
        f"Call {', '.join(parts)} now with arguments taken from the conversation.",
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


def customer_context(customer_id: str) -> Message:
    if not customer_id:
        return Message(
            Role.SYSTEM,
            "The customer is not signed in: you can search the help center, but you cannot "
            "see or change any account. If the answer needs their account, ask them to sign in.",
        )
    return Message(Role.SYSTEM, f"This conversation is about customer {customer_id}.")


def answer_instruction(
    notes: Sequence[str], may_call_tools: bool, proposed: Sequence[str]
) -> Message:
    text = "Write the reply to the customer now, using the tool results above. Be brief."
    if may_call_tools:
        text += " If you still need data to answer, call a tool instead."
    if proposed:
        text += (
            " You proposed: " + "; ".join(proposed) + ". It runs only after the customer "
            "confirms: ask them to confirm, do not say it is done."
        )
    if notes:
        text += " Some things could not be done: " + "; ".join(notes) + ". Say so plainly."
    return Message(Role.SYSTEM, text)


@dataclass(frozen=True)
class ParsedPlan:
    calls: tuple[tuple[str, str], ...]
    reasoning: str
    parsed: bool

    @property
    def tools(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.calls)


_TOOL_RE = re.compile(r'"tool"\s*:\s*"([A-Za-z0-9_.-]+)"(?:\s*,\s*"intent"\s*:\s*"([^"]*))?')


def parse_plan(text: str, known: Sequence[str]) -> ParsedPlan:
    """The plan as decoded; a plan cut off by max_tokens is salvaged call by call."""
    known_set = set(known)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    found: dict[str, str] = {}
    if isinstance(data, dict):
        raw = data.get("calls", [])
        for item in raw if isinstance(raw, list) else []:
            if isinstance(item, dict) and item.get("tool") in known_set:
                found.setdefault(str(item["tool"]), str(item.get("intent", "")).strip())
        return ParsedPlan(
            calls=tuple(found.items()),
            reasoning=str(data.get("reasoning", "")).strip(),
            parsed=True,
        )
    for match in _TOOL_RE.finditer(text):
        if match.group(1) in known_set:
            found.setdefault(match.group(1), (match.group(2) or "").strip())
    return ParsedPlan(calls=tuple(found.items()), reasoning=text.strip()[:300], parsed=False)
