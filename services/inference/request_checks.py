"""Bounds on inference requests, checked by the request guard before a handler runs: counts,
sizes, schema depth, tool names and enum values. Nothing here parses JSON."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb

from services.inference.config import InferenceLimits
from shared.guard import RequestChecks
from shared.limits import (
    check_chars,
    check_count,
    check_enum,
    check_json_text,
    check_pattern,
    over_limit,
)

SERVICE = "/agentmesh.inference.v1.InferenceService/"
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]+")
TOOL_NAME_RULE = "letters, digits, '_' or '-' (no spaces)"

_ROLES = frozenset(common_pb2.Role.values())
_STAGES = frozenset(common_pb2.Stage.values())
_EFFECTS = frozenset(common_pb2.ToolEffect.values())
_MODES = frozenset(pb.ToolChoice.Mode.values())
_DECODING = frozenset(pb.DecodingMode.values())


def check_tool_name(name: str, field: str, limit: int) -> None:
    check_chars(name, field, limit)
    if name:
        check_pattern(name, field, TOOL_NAME, TOOL_NAME_RULE)


def _messages(messages: Sequence[common_pb2.ChatMessage], lim: InferenceLimits) -> None:
    check_count(messages, "messages", lim.max_messages)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        check_enum(message.role, f"{where}.role", _ROLES)
        check_chars(message.content, f"{where}.content", lim.max_message_chars)
        check_chars(message.name, f"{where}.name", lim.max_tool_name_chars)
        check_chars(message.tool_call_id, f"{where}.tool_call_id", lim.max_tool_name_chars * 2)
        check_count(message.tool_calls, f"{where}.tool_calls", lim.max_tool_calls_per_message)
        for j, call in enumerate(message.tool_calls):
            here = f"{where}.tool_calls[{j}]"
            check_tool_name(call.name, f"{here}.name", lim.max_tool_name_chars)
            check_chars(call.id, f"{here}.id", lim.max_tool_name_chars * 2)
            check_json_text(
                call.arguments_json,
                f"{here}.arguments_json",
                max_bytes=lim.max_arguments_bytes,
                max_depth=lim.max_arguments_depth,
            )


def _tools(tools: Sequence[common_pb2.ToolSpec], lim: InferenceLimits) -> None:
    check_count(tools, "tools", lim.max_tools)
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        check_tool_name(tool.name, f"{where}.name", lim.max_tool_name_chars)
        check_chars(tool.description, f"{where}.description", lim.max_tool_description_chars)
        check_enum(tool.effect, f"{where}.effect", _EFFECTS)
        check_json_text(
            tool.parameters_json_schema,
            f"{where}.parameters_json_schema",
            max_bytes=lim.max_schema_bytes,
            max_depth=lim.max_schema_depth,
        )
        check_count(tool.principal_arguments, f"{where}.principal_arguments", 16)
        for j, argument in enumerate(tool.principal_arguments):
            check_chars(argument, f"{where}.principal_arguments[{j}]", lim.max_tool_name_chars)


def _lane(selector: pb.LaneSelector, lim: InferenceLimits) -> None:
    check_chars(selector.lane, "lane.lane", lim.max_tool_name_chars)
    check_enum(selector.stage, "lane.stage", _STAGES)


def _sampling(sampling: pb.SamplingParams, lim: InferenceLimits) -> None:
    check_count(sampling.stop, "sampling.stop", lim.max_stop_sequences)
    for i, stop in enumerate(sampling.stop):
        check_chars(stop, f"sampling.stop[{i}]", lim.max_stop_chars)


def _tool_choice(choice: pb.ToolChoice, lim: InferenceLimits) -> None:
    check_enum(choice.mode, "tool_choice.mode", _MODES)
    check_count(choice.names, "tool_choice.names", lim.max_named_tools)
    for i, name in enumerate(choice.names):
        check_tool_name(name, f"tool_choice.names[{i}]", lim.max_tool_name_chars)


def _generate(lim: InferenceLimits) -> Any:
    def check(request: pb.GenerateRequest | pb.StreamGenerateRequest) -> None:
        _messages(request.messages, lim)
        _tools(request.tools, lim)
        _lane(request.lane, lim)
        _sampling(request.sampling, lim)
        check_json_text(
            request.response_format.json_schema,
            "response_format.json_schema",
            max_bytes=lim.max_schema_bytes,
            max_depth=lim.max_schema_depth,
        )
        if isinstance(request, pb.StreamGenerateRequest):
            _tool_choice(request.tool_choice, lim)
            _max_calls(request.max_calls, lim)

    return check


def _max_calls(value: int, lim: InferenceLimits) -> None:
    if value > lim.max_calls:
        raise over_limit(
            "max_calls", f"{value} is over the limit of {lim.max_calls}", "TOO_MANY", lim.max_calls
        )


def _call_tools(lim: InferenceLimits) -> Any:
    def check(request: pb.CallToolsRequest) -> None:
        _messages(request.messages, lim)
        _tools(request.tools, lim)
        _tool_choice(request.tool_choice, lim)
        _lane(request.lane, lim)
        _sampling(request.sampling, lim)
        _max_calls(request.max_calls, lim)
        check_enum(request.decoding, "decoding", _DECODING)

    return check


def _count_tokens(lim: InferenceLimits) -> Any:
    def check(request: pb.CountTokensRequest) -> None:
        if request.messages:
            _messages(request.messages, lim)
        _tools(request.tools, lim)
        _lane(request.lane, lim)
        check_count(request.texts, "texts", lim.max_texts)
        for i, text in enumerate(request.texts):
            check_chars(text, f"texts[{i}]", lim.max_text_chars)
        _count_text_bytes(request, lim.max_count_text_bytes)

    return check


def _count_text_bytes(request: pb.CountTokensRequest, limit: int) -> None:
    """The text of messages, tools and texts together; the field that crosses ``limit`` is
    named."""
    parts: list[tuple[str, list[str]]] = [
        ("messages", [m.content for m in request.messages]),
        ("tools", [t.name + t.description + t.parameters_json_schema for t in request.tools]),
        ("texts", list(request.texts)),
    ]
    total = 0
    for field, texts in parts:
        total += sum(len(t.encode()) for t in texts)
        if total > limit:
            raise over_limit(
                field,
                f"over the limit of {limit} bytes of text per request, all fields together",
                "TOO_LARGE",
                limit,
            )


def inference_request_checks(limits: InferenceLimits) -> RequestChecks:
    return {
        SERVICE + "Generate": _generate(limits),
        SERVICE + "StreamGenerate": _generate(limits),
        SERVICE + "CallTools": _call_tools(limits),
        SERVICE + "CountTokens": _count_tokens(limits),
    }
