"""Chat rendering: proto messages and tool specs -> one prompt string, deterministically.

The service renders prompts itself (the same sandboxed Jinja set-up transformers uses) instead
of asking the engine's tokenizer, so the text is a pure function of the request: the same
system prompt and tool registry give byte-identical prefixes, which is what makes the engine's
prefix cache hit. The templates also work unchanged with ``vllm serve --chat-template``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from agentmesh.common.v1 import common_pb2
from jinja2 import StrictUndefined, Template
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.inference.config import FewShotExemplar
from shared.errors import InvalidArgument

_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}


@dataclass(frozen=True)
class ToolDef:
    """A validated tool spec: its arguments schema parsed once."""

    name: str
    description: str
    parameters: dict[str, Any]

    def openai_dict(self) -> dict[str, Any]:
        """The shape chat templates (and vLLM's OpenAI server) expect."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Same signature as transformers' chat-template filter, so templates behave alike.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise TemplateError(message)


def load_template(path: Path) -> Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], undefined=StrictUndefined
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(path.read_text())


def parse_tools(specs: Sequence[common_pb2.ToolSpec], field: str = "tools") -> list[ToolDef]:
    """Validate tool specs; a bad one is INVALID_ARGUMENT naming the tool."""
    tools: list[ToolDef] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        if not spec.name:
            raise InvalidArgument(f"{where}.name", "a tool needs a name")
        if spec.name in seen:
            raise InvalidArgument(f"{where}.name", f"tool {spec.name!r} is listed twice")
        seen.add(spec.name)
        text = spec.parameters_json_schema or '{"type":"object"}'
        try:
            schema = json.loads(text)
        except ValueError:
            raise InvalidArgument(
                f"{where}.parameters_json_schema",
                f"tool {spec.name!r}: parameters_json_schema is not valid JSON",
            ) from None
        if not isinstance(schema, dict):
            raise InvalidArgument(
                f"{where}.parameters_json_schema",
                f"tool {spec.name!r}: parameters_json_schema must be a JSON object",
            )
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            path = "/".join(str(p) for p in exc.path) or "(root)"
            raise InvalidArgument(
                f"{where}.parameters_json_schema",
                f"tool {spec.name!r}: not a valid JSON Schema at {path}",
            ) from None
        if schema.get("type", "object") != "object":
            raise InvalidArgument(
                f"{where}.parameters_json_schema",
                f"tool {spec.name!r}: the arguments schema must describe an object",
            )
        tools.append(ToolDef(spec.name, spec.description, schema))
    return tools


def messages_to_dicts(messages: Sequence[common_pb2.ChatMessage]) -> list[dict[str, Any]]:
    """Proto chat messages -> the dicts chat templates read; bad ones are INVALID_ARGUMENT."""
    if not messages:
        raise InvalidArgument("messages", "at least one message is required")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        role = _ROLES.get(msg.role)
        if role is None:
            raise InvalidArgument(
                f"messages[{i}].role", "role must be system, user, assistant or tool"
            )
        item: dict[str, Any] = {"role": role, "content": msg.content}
        if msg.tool_calls:
            if role != "assistant":
                raise InvalidArgument(
                    f"messages[{i}].tool_calls", "only assistant messages carry tool calls"
                )
            calls = []
            for j, call in enumerate(msg.tool_calls):
                try:
                    args = json.loads(call.arguments_json or "{}")
                except ValueError:
                    raise InvalidArgument(
                        f"messages[{i}].tool_calls[{j}].arguments_json", "not valid JSON"
                    ) from None
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": args},
                    }
                )
            item["tool_calls"] = calls
        if role == "tool":
            item["tool_call_id"] = msg.tool_call_id
            item["name"] = msg.name
        out.append(item)
    return out


class PromptRenderer:
    """Renders one lane's chat template (loaded once)."""

    def __init__(self, template_path: Path, few_shot: Sequence[FewShotExemplar] = ()) -> None:
        self._template = load_template(template_path)
        self._few_shot = [ex.model_dump() for ex in few_shot]

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[ToolDef] = (),
        *,
        with_few_shot: bool = False,
    ) -> str:
        return self._template.render(
            messages=messages,
            tools=[t.openai_dict() for t in tools] or None,
            few_shot=self._few_shot if (with_few_shot and tools) else [],
            add_generation_prompt=True,
        )
