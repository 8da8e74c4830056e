"""The inference service through a real gRPC server on 127.0.0.1:0, over a fake engine.

Covers what does not need a real model: statuses, caps, deadlines -> aborts, engine death,
CallTools planning (which generations, which grammars), streaming shape.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.inference.config import LanesConfig, ToolCallFormat
from services.inference.engine import GenParams
from services.inference.prompt import parse_tools
from services.inference.service import SERVICE_NAME, lane_health_name
from services.inference.tool_calls import GrammarBuilder
from tests.inference.fakes import (
    Fake,
    FakeEngineFactory,
    hermes_rest,
    llama3_json_speed,
    prefilled_tool,
    start_fake,
)

LOOKUP = {
    "type": "object",
    "properties": {"customer_id": {"type": "string"}},
    "required": ["customer_id"],
}


def tool(name: str, schema: object = LOOKUP) -> common_pb2.ToolSpec:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return common_pb2.ToolSpec(name=name, description=f"does {name}", parameters_json_schema=text)


def user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


async def _start(factory: FakeEngineFactory, speed_cap: int = 32) -> Fake:
    def configure(lanes: LanesConfig) -> None:
        lanes.lanes["speed"].max_concurrency = speed_cap

    return await start_fake(factory, configure)


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    f = await _start(FakeEngineFactory())
    yield f
    await f.channel.close()
    await f.server.stop(grace=1)


async def test_one_engine_serves_all_lanes_and_health_names_are_serving(fake: Fake) -> None:
    assert len(fake.service.core.engines) == 1 and fake.engine.started
    health = health_pb2_grpc.HealthStub(fake.channel)
    for name in [
        "",
        SERVICE_NAME,
        *(lane_health_name(n) for n in ["workhorse", "planner", "heavy", "speed"]),
    ]:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    lanes = await fake.stub.ListLanes(pb.ListLanesRequest(), timeout=5)
    assert lanes.preset == "embedded"
    assert [lane.name for lane in lanes.lanes] == ["workhorse", "planner", "heavy", "speed"]
    assert {lane.engine_id for lane in lanes.lanes} == {"engine-0"}
    assert all(lane.state == pb.LANE_STATE_SERVING for lane in lanes.lanes)


async def test_stream_forwards_deltas_then_summary(fake: Fake) -> None:
    fake.engine.script = lambda ids, p: "one two three four five six"
    req = pb.StreamGenerateRequest(
        messages=user("hi"),
        lane=pb.LaneSelector(stage=common_pb2.STAGE_COMPOSE, escalation_level=1),
    )
    events = [e async for e in fake.stub.StreamGenerate(req, timeout=10)]
    deltas = [e.text_delta for e in events if e.WhichOneof("event") == "text_delta"]
    assert len(deltas) > 3 and "".join(deltas) == "one two three four five six"
    summary = events[-1].summary
    assert events[-1].WhichOneof("event") == "summary"
    assert summary.usage.completion_tokens == len("one two three four five six")
    assert summary.usage.prompt_tokens > 0
    assert summary.finish_reason == pb.FINISH_REASON_STOP
    assert summary.lane.lane == "planner" and "escalation level 1" in summary.lane.reason
    registry = fake.service.metrics_registry
    labels = {"lane": "planner", "kind": "completion"}
    assert registry.get_sample_value("agentmesh_inference_tokens_total", labels) == len(
        "one two three four five six"
    )


async def test_generate_json_schema_and_sampling_reach_the_engine(fake: Fake) -> None:
    fake.engine.script = lambda ids, p: '{"steps":[]}'
    schema = {"type": "object", "properties": {"steps": {"type": "array"}}}
    reply = await fake.stub.Generate(
        pb.GenerateRequest(
            messages=user("plan"),
            lane=pb.LaneSelector(lane="workhorse"),
            sampling=pb.SamplingParams(max_tokens=7, temperature=0.5, seed=3),
            response_format=pb.ResponseFormat(json_schema=json.dumps(schema)),
        ),
        timeout=10,
    )
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH  # 12 chars > 7 tokens
    _, params = fake.engine.requests[-1]
    assert params.max_tokens == 7 and params.temperature == 0.5 and params.seed == 3
    assert params.grammar is not None and "steps" in params.grammar


def _code_and_message(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    return err.code(), err.details() or ""


BAD_INPUTS = [
    (
        "unknown lane",
        "Generate",
        pb.GenerateRequest(messages=user("x"), lane=pb.LaneSelector(lane="nope")),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
    ("no messages", "Generate", pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (
        "no messages (stream)",
        "StreamGenerate",
        pb.StreamGenerateRequest(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages",
    ),
    (
        "prompt too long",
        "Generate",
        pb.GenerateRequest(messages=user("y" * 5000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "4096",
    ),
    (
        "bad tool schema",
        "CallTools",
        pb.CallToolsRequest(
            messages=user("x"),
            tools=[tool("fine"), tool("bad_tool", {"type": "object", "required": "oops"})],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad_tool",
    ),
    (
        "tool schema not json",
        "CallTools",
        pb.CallToolsRequest(messages=user("x"), tools=[tool("broken", "{nope")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "broken",
    ),
    (
        "no tools",
        "CallTools",
        pb.CallToolsRequest(messages=user("x")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tools",
    ),
    (
        "named tool missing",
        "CallTools",
        pb.CallToolsRequest(
            messages=user("x"),
            tools=[tool("a")],
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NAMED, names=["b"]),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'b'",
    ),
    (
        "bad response schema",
        "Generate",
        pb.GenerateRequest(messages=user("x"), response_format=pb.ResponseFormat(json_schema="[1")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "response_format",
    ),
]


@pytest.mark.parametrize(
    ("case", "method", "request_msg", "code", "needle"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
async def test_bad_input_statuses(
    fake: Fake, case: str, method: str, request_msg: object, code: grpc.StatusCode, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        call = getattr(fake.stub, method)(request_msg, timeout=10)
        if method == "StreamGenerate":
            async for _ in call:
                pass
        else:
            await call
    got, message = _code_and_message(err.value)
    assert got == code, message
    assert needle in message
    if case == "prompt too long":
        assert "5" in message and "tokens" in message  # both counts
    assert not fake.engine.requests  # nothing reached the engine


async def test_lane_cap_gives_resource_exhausted_with_retry_hint() -> None:
    factory = FakeEngineFactory(step_s=0.05)
    f = await _start(factory, speed_cap=1)
    try:
        f.engine.script = lambda ids, p: "x" * 200
        first = f.stub.StreamGenerate(
            pb.StreamGenerateRequest(messages=user("a"), lane=pb.LaneSelector(lane="speed")),
            timeout=30,
        )
        await first.read()  # the first request holds the only slot
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await f.stub.Generate(
                pb.GenerateRequest(messages=user("b"), lane=pb.LaneSelector(lane="speed")),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(err.value)
        assert status is not None
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert retry, "RetryInfo detail missing"
        info = error_details_pb2.RetryInfo()
        retry[0].Unpack(info)
        assert info.retry_delay.ToMilliseconds() > 0
        rejected = f.service.metrics_registry.get_sample_value(
            "agentmesh_inference_rejected_total", {"lane": "speed"}
        )
        assert rejected == 1
        # Another lane on the same engine is not affected by speed's cap.
        ok = await f.stub.Generate(
            pb.GenerateRequest(messages=user("c"), lane=pb.LaneSelector(lane="workhorse")),
            timeout=30,
        )
        assert ok.lane.lane == "workhorse"
        first.cancel()
    finally:
        await f.channel.close()
        await f.server.stop(grace=1)


async def test_deadline_aborts_the_engine_request() -> None:
    factory = FakeEngineFactory(step_s=0.05)
    f = await _start(factory)
    try:
        f.engine.script = lambda ids, p: "z" * 400
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await f.stub.Generate(pb.GenerateRequest(messages=user("slow")), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):
            if f.engine.aborted:
                break
            await asyncio.sleep(0.02)
        assert len(f.engine.aborted) == 1
        assert not f.engine.live and not f.service.core.live_requests
        assert all(lane.in_flight == 0 for lane in f.service.core.lanes.values())
    finally:
        await f.channel.close()
        await f.server.stop(grace=1)


async def test_engine_death_flips_health_and_fails_fast(fake: Fake) -> None:
    fake.engine.dead = True
    health = health_pb2_grpc.HealthStub(fake.channel)
    name = lane_health_name("workhorse")
    status = None
    for _ in range(60):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        status = reply.status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.1)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    for overall in ["", SERVICE_NAME]:  # every lane is down: so is the service
        reply = await health.Check(health_pb2.HealthCheckRequest(service=overall), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, overall
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fake.stub.Generate(pb.GenerateRequest(messages=user("x")), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    lanes = await fake.stub.ListLanes(pb.ListLanesRequest(), timeout=5)
    assert all(lane.state == pb.LANE_STATE_FAILED for lane in lanes.lanes)


def _hermes(name: str, args: dict[str, object]) -> str:
    body = json.dumps({"name": name, "arguments": args}, separators=(",", ":"))
    return f"<tool_call>\n{body}\n</tool_call>"


NAMES = ["crm_lookup", "kb_search", "billing_invoice"]


def _opener(name: str) -> list[int]:
    """The fake's token ids (characters) of a hermes call's opener."""
    return [ord(c) for c in f'<tool_call>\n{{"name":"{name}","arguments":']


def _named_parallel(**kwargs: object) -> pb.CallToolsRequest:
    return pb.CallToolsRequest(
        messages=user("do three things"),
        tools=[tool(n) for n in NAMES],
        tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NAMED, names=NAMES),
        parallel=True,
        **kwargs,  # type: ignore[arg-type]
    )


def _prefilled_script(ids: list[int], p: GenParams) -> str:
    """'The model' after CallTools prefilled a call's opener: the arguments and the closer."""
    name = prefilled_tool(ids)
    assert name is not None, "the prompt does not end with a call opener"
    return hermes_rest({"customer_id": name[:3]})


async def test_call_tools_named_parallel_prefills_each_calls_opener(fake: Fake) -> None:
    fake.engine.script = _prefilled_script
    reply = await fake.stub.CallTools(
        _named_parallel(lane=pb.LaneSelector(stage=common_pb2.STAGE_TOOL_CALL)), timeout=10
    )
    assert reply.generations == 3
    # The calls are what they were when the model decoded the whole call.
    got = [
        (c.call.name, json.loads(c.call.arguments_json), c.outcome, c.raw_text) for c in reply.calls
    ]
    expected_args: list[dict[str, object]] = [{"customer_id": n[:3]} for n in NAMES]
    assert got == [
        (n, a, pb.PARSE_OUTCOME_OK, _hermes(n, a))
        for n, a in zip(NAMES, expected_args, strict=True)
    ]
    prompts = {prefilled_tool(ids): (ids, p) for ids, p in fake.engine.requests}
    assert sorted(n for n in prompts if n) == sorted(NAMES)
    shared = set()
    for name, (ids, params) in prompts.items():
        assert name is not None
        opener = _opener(name)
        assert ids[-len(opener) :] == opener
        shared.add(tuple(ids[: -len(opener)]))
        # The grammar starts at the arguments: no tool name, no opener in it.
        assert params.grammar is not None
        assert not any(n in params.grammar for n in NAMES) and "<tool_call>" not in params.grammar
        (spec,) = parse_tools([tool(name)])
        assert params.grammar == GrammarBuilder().arguments(spec, ToolCallFormat.HERMES)
    (prompt,) = shared  # the same rendered prompt under every call -> one prefix for the cache
    assert reply.usage.prompt_tokens == 3 * len(prompt) + sum(len(_opener(n)) for n in NAMES)
    # Only what was generated: the arguments and the closer, not the opener.
    rests = [hermes_rest(a) for a in expected_args]
    assert reply.usage.completion_tokens == sum(len(r) for r in rests)
    assert reply.usage.completion_tokens == sum(
        len(c.raw_text) - len(_opener(c.call.name)) for c in reply.calls
    )


async def test_unconstrained_named_parallel_decodes_the_whole_call(fake: Fake) -> None:
    fake.engine.script = _prefilled_script
    await fake.stub.CallTools(_named_parallel(lane=pb.LaneSelector(lane="workhorse")), timeout=10)
    first = fake.engine.requests[0][0]
    name = prefilled_tool(first)
    assert name is not None
    shared = first[: -len(_opener(name))]  # the rendered prompt the constrained calls share

    fake.engine.requests.clear()
    fake.engine.script = lambda ids, p: _hermes("kb_search", {"customer_id": "kb_"})
    reply = await fake.stub.CallTools(
        _named_parallel(
            lane=pb.LaneSelector(lane="workhorse"), decoding=pb.DECODING_MODE_UNCONSTRAINED
        ),
        timeout=10,
    )
    assert len(fake.engine.requests) == 3
    for ids, params in fake.engine.requests:
        assert ids == shared and params.grammar is None  # no prefill, no grammar
    # The model alone wrote kb_search every time: only the kb_search generation's call is OK.
    outcomes = [(c.call.name, c.outcome, c.parse_error) for c in reply.calls]
    assert outcomes == [
        ("kb_search", pb.PARSE_OUTCOME_FAILED, "expected a call of 'crm_lookup'"),
        ("kb_search", pb.PARSE_OUTCOME_OK, ""),
        ("kb_search", pb.PARSE_OUTCOME_FAILED, "expected a call of 'billing_invoice'"),
    ]
    full = _hermes("kb_search", {"customer_id": "kb_"})
    assert reply.calls[1].raw_text == full
    assert reply.usage.completion_tokens == 3 * len(full)


async def test_call_tools_opener_ids_are_encoded_once_per_lane_and_tool(fake: Fake) -> None:
    encoded: list[str] = []
    encode = fake.engine.encode

    def counting(text: str) -> list[int]:
        encoded.append(text)
        return encode(text)

    fake.engine.encode = counting  # type: ignore[method-assign]
    fake.engine.script = _prefilled_script
    for lane in ["workhorse", "workhorse", "speed"]:
        reply = await fake.stub.CallTools(
            _named_parallel(lane=pb.LaneSelector(lane=lane)), timeout=10
        )
        assert [c.outcome for c in reply.calls] == [pb.PARSE_OUTCOME_OK] * 3
    openers = sorted(t for t in encoded if t.startswith("<tool_call>"))
    assert openers == sorted(
        "".join(chr(i) for i in _opener(n)) for n in NAMES for _ in ("workhorse", "speed")
    )


async def test_call_tools_parallel_selection_then_prefilled_arguments(fake: Fake) -> None:
    def script(ids: list[int], p: GenParams) -> str:
        name = prefilled_tool(ids)
        if name is None:
            return '["b","a"]'
        return hermes_rest({"customer_id": name})

    fake.engine.script = script
    reply = await fake.stub.CallTools(
        pb.CallToolsRequest(
            messages=user("x"),
            tools=[tool("a"), tool("b"), tool("c")],
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
            parallel=True,
        ),
        timeout=10,
    )
    assert reply.generations == 3  # 1 selection + 2 argument generations
    assert [(c.call.name, c.outcome) for c in reply.calls] == [
        ("b", pb.PARSE_OUTCOME_OK),
        ("a", pb.PARSE_OUTCOME_OK),
    ]
    assert [c.raw_text for c in reply.calls] == [
        _hermes("b", {"customer_id": "b"}),
        _hermes("a", {"customer_id": "a"}),
    ]
    selection, *arguments = fake.engine.requests
    assert prefilled_tool(selection[0]) is None
    assert sorted(prefilled_tool(ids) or "" for ids, _ in arguments) == ["a", "b"]
    for ids, _ in arguments:
        assert ids[: len(selection[0])] == selection[0]  # the selection's prompt, then the opener
    assert reply.usage.completion_tokens == len('["b","a"]') + sum(
        len(hermes_rest({"customer_id": n})) for n in "ab"
    )


async def test_llama3_json_lane_named_call_is_prefilled_too() -> None:
    f = await start_fake(FakeEngineFactory(), llama3_json_speed)
    try:
        f.engine.script = lambda ids, p: '{"customer_id":"C-3"}}'
        reply = await f.stub.CallTools(
            pb.CallToolsRequest(
                messages=user("x"),
                tools=[tool("crm_lookup"), tool("kb_search")],
                tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NAMED, names=["crm_lookup"]),
                lane=pb.LaneSelector(lane="speed"),
            ),
            timeout=10,
        )
        ((ids, params),) = f.engine.requests
        opener = '{"name":"crm_lookup","parameters":'
        assert "".join(chr(i) for i in ids).endswith(opener)
        assert params.grammar is not None and "crm_lookup" not in params.grammar
        (call,) = reply.calls
        assert (call.call.name, call.outcome, call.raw_text) == (
            "crm_lookup",
            pb.PARSE_OUTCOME_OK,
            '{"name":"crm_lookup","parameters":{"customer_id":"C-3"}}',
        )
        assert json.loads(call.call.arguments_json) == {"customer_id": "C-3"}
        assert reply.usage.completion_tokens == len('{"customer_id":"C-3"}}')
    finally:
        await f.close()


async def test_call_tools_single_generation_respects_max_calls(fake: Fake) -> None:
    fake.engine.script = lambda ids, p: "\n".join(
        _hermes("a", {"customer_id": str(i)}) for i in range(4)
    )
    reply = await fake.stub.CallTools(
        pb.CallToolsRequest(
            messages=user("x"),
            tools=[tool("a")],
            max_calls=2,
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
        ),
        timeout=10,
    )
    assert reply.generations == 1 and len(reply.calls) == 2
    _, params = fake.engine.requests[-1]
    assert params.grammar is not None


async def test_unconstrained_mode_decodes_freely_and_reports_failures(fake: Fake) -> None:
    fake.engine.script = lambda ids, p: (
        '<tool_call>\n{"name":"a","arguments":{"cust":1}}\n</tool_call>'
    )
    reply = await fake.stub.CallTools(
        pb.CallToolsRequest(
            messages=user("x"),
            tools=[tool("a")],
            decoding=pb.DECODING_MODE_UNCONSTRAINED,
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
        ),
        timeout=10,
    )
    _, params = fake.engine.requests[-1]
    assert params.grammar is None
    assert len(reply.calls) == 1
    assert reply.calls[0].outcome == pb.PARSE_OUTCOME_FAILED
    assert "schema" in reply.calls[0].parse_error
    assert reply.calls[0].raw_text.startswith("<tool_call>")


async def test_auto_mode_text_answer_means_no_calls(fake: Fake) -> None:
    fake.engine.script = lambda ids, p: "No tool needed."
    reply = await fake.stub.CallTools(
        pb.CallToolsRequest(
            messages=user("hello"),
            tools=[tool("a")],
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO),
        ),
        timeout=10,
    )
    assert len(reply.calls) == 0 and reply.generations == 1


async def test_deadline_during_parallel_call_tools_aborts_every_generation() -> None:
    f = await _start(FakeEngineFactory(step_s=0.05))
    try:
        f.engine.script = lambda ids, p: "x" * 400
        names = ["a", "b", "c"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await f.stub.CallTools(
                pb.CallToolsRequest(
                    messages=user("x"),
                    tools=[tool(n) for n in names],
                    parallel=True,
                    tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NAMED, names=names),
                ),
                timeout=0.5,
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):
            if len(f.engine.aborted) == 3:
                break
            await asyncio.sleep(0.02)
        assert len(f.engine.aborted) == 3
        assert not f.engine.live and not f.service.core.live_requests
    finally:
        await f.channel.close()
        await f.server.stop(grace=1)
