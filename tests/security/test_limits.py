"""Bounded requests through real servers: undecodable bytes, oversized requests, deep JSON,
tool names with spaces and unknown enum values are INVALID_ARGUMENT naming the field and the
limit, in our words (never the decoder's), before any expensive parsing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as ipb
from agentmesh.tools.v1 import tools_pb2 as tpb
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.inference.config import InferenceLimits, InferenceSettings
from services.inference.service import InferenceService
from services.tools.config import ToolsSettings
from services.tools.service import ToolsService
from shared.limits import json_depth
from shared.server import GrpcServer
from tests.inference.fakes import FakeEngineFactory
from tests.security.strategies import deep_json, invalid_utf8_at
from tests.tools.fakes import HashEmbedder

INFERENCE = "/agentmesh.inference.v1.InferenceService/"
TOOLS = "/agentmesh.tools.v1.ToolService/"
LOOKUP = json.dumps({"type": "object", "properties": {"customer_id": {"type": "string"}}})


def _violation(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violation = bad.field_violations[0]
            return violation.field, violation.description
    raise AssertionError("no BadRequest detail")


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[dict[str, GrpcServer]]:
    limits = InferenceLimits(method_max_request_bytes={"ListLanes": 2048})
    inference_settings = InferenceSettings(port=0, metrics_port=0, grace_seconds=1, limits=limits)
    inference = InferenceService(inference_settings, engine_factory=FakeEngineFactory())
    tools_settings = ToolsSettings(
        port=0,
        metrics_port=0,
        grace_seconds=1,
        data_dir=tmp_path,
        max_message_bytes=8 * 1024 * 1024,
    )
    tools = ToolsService(tools_settings, embedder=HashEmbedder())
    started: dict[str, GrpcServer] = {}
    try:
        for name, service, settings in (
            ("inference", inference, inference_settings),
            ("tools", tools, tools_settings),
        ):
            server = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
            await server.start()
            await server.wait_until_serving(60)
            started[name] = server
        yield started
    finally:
        for server in started.values():
            await server.stop(grace=0.5)


async def _raw(server: GrpcServer, method: str, payload: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(
        server.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(method)(payload, timeout=30)
        return caught.value


async def test_invalid_utf8_is_invalid_argument_without_the_decoders_text(
    servers: dict[str, GrpcServer],
) -> None:
    valid = tpb.ExecuteToolRequest(
        invocation=tpb.ToolInvocation(call_id="c1", name="kb_search", arguments_json="{}")
    ).SerializeToString()
    # invocation (1) -> name (2) holding bytes that are not UTF-8.
    error = await _raw(servers["tools"], TOOLS + "ExecuteTool", valid + invalid_utf8_at([1, 2]))
    field, description = _violation(error)
    assert field == "request"
    assert "not a valid message" in description
    for leak in ("DecodeError", "Error parsing", "Unexpected", "Traceback"):
        assert leak not in (error.details() or "")


async def test_arguments_nested_10000_deep_name_the_field_and_the_limit(
    servers: dict[str, GrpcServer],
) -> None:
    deep = deep_json(10_000, "{")
    request = tpb.ExecuteToolRequest(
        invocation=tpb.ToolInvocation(call_id="c1", name="crm_lookup", arguments_json=deep)
    )
    error = await _raw(servers["tools"], TOOLS + "ExecuteTool", request.SerializeToString())
    assert _violation(error) == (
        "invocation.arguments_json",
        "JSON nested 10000 levels deep is over the limit of 32",
    )
    batch = tpb.ExecuteToolsRequest(
        invocations=[
            tpb.ToolInvocation(call_id="a", name="kb_search", arguments_json='{"query": "x"}'),
            tpb.ToolInvocation(call_id="b", name="kb_search", arguments_json="[" * 10_000),
        ]
    )
    error = await _raw(servers["tools"], TOOLS + "ExecuteTools", batch.SerializeToString())
    assert _violation(error)[0] == "invocations[1].arguments_json"
    big = json.dumps({"query": "x" * 70_000})
    request = tpb.ExecuteToolRequest(
        invocation=tpb.ToolInvocation(call_id="c1", name="kb_search", arguments_json=big)
    )
    error = await _raw(servers["tools"], TOOLS + "ExecuteTool", request.SerializeToString())
    field, description = _violation(error)
    assert field == "invocation.arguments_json"
    assert description.endswith("over the limit of 65536 bytes")


async def test_tool_names_with_spaces_are_refused(servers: dict[str, GrpcServer]) -> None:
    call = ipb.CallToolsRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")],
        tools=[common_pb2.ToolSpec(name="crm lookup", parameters_json_schema=LOOKUP)],
    )
    error = await _raw(servers["inference"], INFERENCE + "CallTools", call.SerializeToString())
    field, description = _violation(error)
    assert field == "tools[0].name"
    assert "no spaces" in description
    request = tpb.ExecuteToolRequest(invocation=tpb.ToolInvocation(name="crm lookup"))
    error = await _raw(servers["tools"], TOOLS + "ExecuteTool", request.SerializeToString())
    assert _violation(error)[0] == "invocation.name"


async def test_schema_depth_history_arguments_and_unknown_enums(
    servers: dict[str, GrpcServer],
) -> None:
    deep_schema = '{"type": "object", "properties": {"a": ' * 20 + "{}" + "}}" * 20
    user = common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")
    cases = {
        "tools[0].parameters_json_schema": ipb.CallToolsRequest(
            messages=[user],
            tools=[common_pb2.ToolSpec(name="t", parameters_json_schema=deep_schema)],
        ),
        "messages[1].tool_calls[0].arguments_json": ipb.CallToolsRequest(
            messages=[
                user,
                common_pb2.ChatMessage(
                    role=common_pb2.ROLE_ASSISTANT,
                    tool_calls=[common_pb2.ToolCall(id="1", name="t", arguments_json="[" * 10_000)],
                ),
            ],
            tools=[common_pb2.ToolSpec(name="t", parameters_json_schema=LOOKUP)],
        ),
        "tool_choice.mode": ipb.CallToolsRequest(
            messages=[user],
            tools=[common_pb2.ToolSpec(name="t", parameters_json_schema=LOOKUP)],
            tool_choice=ipb.ToolChoice(mode=99),  # type: ignore[arg-type]
        ),
        "messages": ipb.CallToolsRequest(
            messages=[user] * 300,
            tools=[common_pb2.ToolSpec(name="t", parameters_json_schema=LOOKUP)],
        ),
    }
    for field, request in cases.items():
        error = await _raw(
            servers["inference"], INFERENCE + "CallTools", request.SerializeToString()
        )
        got, description = _violation(error)
        assert got == field, description
        if field == "tool_choice.mode":  # the case's field, not what the server did
            assert "unknown enum value 99" in description, description
        else:
            assert "limit" in description, description


async def test_request_size_limits_per_rpc_and_the_transport_cap(
    servers: dict[str, GrpcServer],
) -> None:
    # ListLanes is configured down to 2 KiB; 3 KiB of an unknown field is over it.
    padding = b"\x82\x7d" + bytes([0x80, 0x18]) + b"\x00" * 3072  # field 2000, 3072 bytes
    error = await _raw(servers["inference"], INFERENCE + "ListLanes", padding)
    field, description = _violation(error)
    assert field == "request"
    assert description == "3076 bytes is over the 2048-byte limit of ListLanes"
    # The tool service's default limit is 2 MiB; its transport cap 8 MiB.
    big = tpb.ExecuteToolRequest(
        invocation=tpb.ToolInvocation(name="kb_search", call_id="x" * (3 << 20))
    )
    error = await _raw(servers["tools"], TOOLS + "ExecuteTool", big.SerializeToString())
    assert _violation(error)[1].endswith("over the 2097152-byte limit of ExecuteTool")
    huge = tpb.ExecuteToolRequest(
        invocation=tpb.ToolInvocation(name="kb_search", call_id="x" * (9 << 20))
    )
    error = await _raw(servers["tools"], TOOLS + "ExecuteTool", huge.SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert json_depth('{"a": "[[[[{{{{", "b": [1, [2]]}') == 3
    assert json_depth('"\\"[[["') == 0
    assert json_depth("[" * 10_000) == 10_000
    assert json_depth("") == 0
