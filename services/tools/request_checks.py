"""Bounds on tool requests, checked by the request guard before the executor parses any
arguments: batch size, tool-name format, argument JSON size and nesting depth."""

from __future__ import annotations

import re
from collections.abc import Sequence

from agentmesh.tools.v1 import tools_pb2

from services.tools.config import ToolsLimits
from shared.guard import RequestChecks
from shared.limits import check_chars, check_count, check_json_text, check_pattern

SERVICE = "/agentmesh.tools.v1.ToolService/"
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_invocation(inv: tools_pb2.ToolInvocation, where: str, lim: ToolsLimits) -> None:
    check_chars(inv.name, f"{where}.name", lim.max_tool_name_chars)
    check_pattern(inv.name, f"{where}.name", TOOL_NAME, "letters, digits, '_' or '-' (no spaces)")
    check_chars(inv.call_id, f"{where}.call_id", lim.max_call_id_chars)
    check_chars(inv.idempotency_key, f"{where}.idempotency_key", lim.max_idempotency_key_chars)
    check_json_text(
        inv.arguments_json,
        f"{where}.arguments_json",
        max_bytes=lim.max_arguments_bytes,
        max_depth=lim.max_arguments_depth,
    )


def _invocations(invocations: Sequence[tools_pb2.ToolInvocation], lim: ToolsLimits) -> None:
    check_count(invocations, "invocations", lim.max_batch)
    for i, inv in enumerate(invocations):
        check_invocation(inv, f"invocations[{i}]", lim)


def tools_request_checks(limits: ToolsLimits) -> RequestChecks:
    def execute_tool(request: tools_pb2.ExecuteToolRequest) -> None:
        if request.HasField("invocation"):
            check_invocation(request.invocation, "invocation", limits)

    def execute_tools(request: tools_pb2.ExecuteToolsRequest) -> None:
        _invocations(request.invocations, limits)

    return {SERVICE + "ExecuteTool": execute_tool, SERVICE + "ExecuteTools": execute_tools}
