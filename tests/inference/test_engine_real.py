"""The inference service on the real vLLM engine with the embedded model (SmolLM2-135M).

One engine for the whole session (tests/fixtures_inference.py). No timing assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import grpc
import jsonschema
import psutil
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from agentmesh.inference.v1 import inference_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.inference.config import ToolCallFormat
from services.inference.cpu_threads import choose_cpu_threads, choose_service_cores
from services.inference.machine import machine_facts
from services.inference.service import SERVICE_NAME, lane_health_name
from services.inference.tool_calls import CALL_SHAPES
from shared.cpu_affinity import format_id_list
from tests.fixtures_inference import InferenceStack

pytestmark = pytest.mark.slow

TOOLS = {
    "crm_lookup": {
        "type": "object",
        "properties": {"customer_id": {"type": "string", "pattern": "^C-[0-9]{1,6}$"}},
        "required": ["customer_id"],
        "additionalProperties": False,
    },
    "kb_search": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 60},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 10},
        },
        "required": ["query", "top_k"],
        "additionalProperties": False,
    },
    "billing_invoice": {
        "type": "object",
        "properties": {
            "invoice_id": {"type": "string", "pattern": "^INV-[0-9]{1,6}$"},
            "include_lines": {"type": "boolean"},
        },
        "required": ["invoice_id", "include_lines"],
        "additionalProperties": False,
    },
}
DESCRIPTIONS = {
    "crm_lookup": "Look up a customer record by id.",
    "kb_search": "Search the help-center knowledge base.",
    "billing_invoice": "Fetch an invoice by id.",
}


def specs() -> list[common_pb2.ToolSpec]:
    return [
        common_pb2.ToolSpec(
            name=n, description=DESCRIPTIONS[n], parameters_json_schema=json.dumps(s)
        )
        for n, s in TOOLS.items()
    ]


def convo(
    user: str, system: str = "You are a concise support agent for Acme."
) -> list[common_pb2.ChatMessage]:
    return [
        common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system),
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=user),
    ]


@pytest.fixture
async def stub(inference_server: str) -> pb_grpc.InferenceServiceStub:
    channel = grpc.aio.insecure_channel(inference_server)
    return pb_grpc.InferenceServiceStub(channel)


async def test_health_is_serving_after_warm_up(inference_stack: InferenceStack) -> None:
    async with grpc.aio.insecure_channel(inference_stack.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ["", SERVICE_NAME, lane_health_name("workhorse"), lane_health_name("speed")]:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        lanes = await pb_grpc.InferenceServiceStub(channel).ListLanes(pb.ListLanesRequest())
        assert {lane.engine_id for lane in lanes.lanes} == {"engine-0"}
        assert all(lane.state == pb.LANE_STATE_SERVING for lane in lanes.lanes)
        assert all(lane.max_model_len == 4096 for lane in lanes.lanes)
    # The KV cache and OpenMP binding reported are what vLLM got: its cache config (the
    # fixture sets cpu_kvcache_gib=2) and the binding in the environment its core read.
    engine = inference_stack.service.core.engines["engine-0"]
    cache = engine._llm.vllm_config.cache_config  # type: ignore[attr-defined]
    # The machine as the engine's start found it (before this process was pinned).
    allowed = inference_stack.service.placement.allowed
    assert allowed is not None
    facts = machine_facts("cpu", allowed_cpus=allowed)
    threads = choose_cpu_threads("cpu", "auto", facts.cpus)
    cores = choose_service_cores("auto", threads, facts.cpus)
    assert engine.setup.service_cores == cores  # type: ignore[attr-defined]
    # This process (every thread) and vLLM's engine core on the cores off the OpenMP team
    # (on 4+ cores), or where they were if none is (2 cores: too few); the engine's worker
    # keeps its OpenMP thread on the team's cores (0 here).
    placed = format_id_list(cores.cores or allowed)
    assert set(thread_cpus(os.getpid()).values()) == {placed}
    engine_cores = engine.engine_core_pids  # type: ignore[attr-defined]
    assert len(engine_cores) == 1
    assert set(thread_cpus(engine_cores[0]).values()) == {placed}
    workers = [
        child
        for child in psutil.Process(engine_cores[0]).children()
        if "Worker" in " ".join(child.cmdline())
    ]
    assert len(workers) == 1
    assert thread_cpus(workers[0].pid)[workers[0].pid] == threads.bind
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    for lane in lanes.lanes:
        assert lane.kv_cache_bytes == cache.kv_cache_memory_bytes == 2 * 1024**3
        assert lane.kv_cache_tokens == cache.num_gpu_blocks * cache.block_size > 0
        # Our KV bytes per token (config.json, the dtype) are vLLM's: whole blocks of them.
        block_bytes = engine.setup.kv_cache.bytes_per_token * cache.block_size
        assert lane.kv_cache_tokens == lane.kv_cache_bytes // block_bytes * cache.block_size
        assert lane.kv_cache_reason == "set by cpu_kvcache_gib (2 GiB)"
        assert lane.cpu_threads_bind == os.environ["VLLM_CPU_OMP_THREADS_BIND"] == threads.bind
        assert lane.cpu_threads_reason == engine.setup.cpu_threads_reason  # type: ignore[attr-defined]
        assert lane.cpu_threads_reason.startswith(f"{threads.reason}; process ")


def thread_cpus(pid: int) -> dict[int, str]:
    """Each thread of process ``pid``: its Cpus_allowed_list."""
    found = {}
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        found[int(status.parent.name)] = fields["Cpus_allowed_list"].strip()
    return found


async def test_stream_yields_several_deltas_then_usage(stub: pb_grpc.InferenceServiceStub) -> None:
    req = pb.StreamGenerateRequest(
        messages=convo("Describe the sea in three sentences."),
        lane=pb.LaneSelector(stage=common_pb2.STAGE_COMPOSE),
        sampling=pb.SamplingParams(max_tokens=40),
    )
    events = [e async for e in stub.StreamGenerate(req, timeout=120)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "summary" and kinds.count("summary") == 1
    deltas = [e.text_delta for e in events[:-1]]
    assert len(deltas) >= 3 and all(deltas)
    summary = events[-1].summary
    assert summary.usage.prompt_tokens > 10
    assert 3 <= summary.usage.completion_tokens <= 40
    assert summary.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert summary.lane.lane == "workhorse" and summary.lane.model
    assert summary.time_to_first_token.ToNanoseconds() > 0


async def test_call_tools_three_tools_three_schema_valid_calls(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    names = list(TOOLS)
    reply = await stub.CallTools(
        pb.CallToolsRequest(
            messages=convo("Customer C-1042 asks why invoice INV-77 charged twice; check the KB."),
            tools=specs(),
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NAMED, names=names),
            parallel=True,
            lane=pb.LaneSelector(stage=common_pb2.STAGE_TOOL_CALL),
        ),
        timeout=180,
    )
    assert reply.generations == 3
    assert [c.call.name for c in reply.calls] == names
    for emitted in reply.calls:
        assert emitted.outcome == pb.PARSE_OUTCOME_OK, (emitted.parse_error, emitted.raw_text)
        args = json.loads(emitted.call.arguments_json)
        jsonschema.validate(args, TOOLS[emitted.call.name])
        assert emitted.raw_text.startswith("<tool_call>\n{") and ", " not in emitted.raw_text[:40]
    assert len({c.call.id for c in reply.calls}) == 3
    assert reply.usage.completion_tokens > 0


async def test_named_parallel_calls_decode_only_what_follows_the_prefilled_opener(
    inference_stack: InferenceStack, stub: pb_grpc.InferenceServiceStub
) -> None:
    names = list(TOOLS)
    reply = await stub.CallTools(
        pb.CallToolsRequest(
            messages=convo("Customer C-2210 says invoice INV-5 is wrong; search the KB too."),
            tools=specs(),
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NAMED, names=names),
            parallel=True,
            lane=pb.LaneSelector(lane="workhorse"),
        ),
        timeout=180,
    )
    assert reply.generations == 3
    assert [c.call.name for c in reply.calls] == names
    shape = CALL_SHAPES[ToolCallFormat.HERMES]
    for emitted in reply.calls:
        assert emitted.outcome == pb.PARSE_OUTCOME_OK, (emitted.parse_error, emitted.raw_text)
        assert emitted.raw_text.startswith(shape.opener(emitted.call.name))
        assert emitted.raw_text.endswith(shape.closer)
    engine = inference_stack.service.core.lanes["workhorse"].engine
    # Decoding the whole call would have generated at least its own tokens per call (plus the
    # end token); the prefilled openers are not generated.
    whole_calls = sum(len(engine.encode(c.raw_text)) for c in reply.calls)
    openers = sum(len(engine.encode(shape.opener(n))) for n in names)
    assert openers >= 3 * 10
    assert reply.usage.completion_tokens < whole_calls
    assert reply.usage.prompt_tokens > openers


async def test_call_tools_single_generation_required(stub: pb_grpc.InferenceServiceStub) -> None:
    reply = await stub.CallTools(
        pb.CallToolsRequest(
            messages=convo("Look up customer C-7."),
            tools=specs(),
            max_calls=2,
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
        ),
        timeout=180,
    )
    assert reply.generations == 1
    assert 1 <= len(reply.calls) <= 2
    for emitted in reply.calls:
        assert emitted.outcome == pb.PARSE_OUTCOME_OK, (emitted.parse_error, emitted.raw_text)
        jsonschema.validate(json.loads(emitted.call.arguments_json), TOOLS[emitted.call.name])


async def test_second_call_with_same_prefix_reports_cached_tokens(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    # A system prompt no earlier test used, so the first call cannot hit the cache.
    system = f"You are support agent {uuid.uuid4().hex} for Acme. Be brief and factual."
    first = await stub.Generate(
        pb.GenerateRequest(
            messages=convo("What are your opening hours?", system),
            tools=specs(),
            sampling=pb.SamplingParams(max_tokens=4),
        ),
        timeout=120,
    )
    second = await stub.Generate(
        pb.GenerateRequest(
            messages=convo("Can I change my billing address?", system),
            tools=specs(),
            sampling=pb.SamplingParams(max_tokens=4),
        ),
        timeout=120,
    )
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens > 0
    assert second.usage.cached_prompt_tokens < second.usage.prompt_tokens


async def test_generate_with_json_schema_returns_matching_json(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "intent": {"type": "string", "enum": ["billing", "account", "other"]},
            "urgent": {"type": "boolean"},
        },
        "required": ["intent", "urgent"],
        "additionalProperties": False,
    }
    reply = await stub.Generate(
        pb.GenerateRequest(
            messages=convo("I was charged twice! Classify this message."),
            lane=pb.LaneSelector(stage=common_pb2.STAGE_PLAN),
            response_format=pb.ResponseFormat(json_schema=json.dumps(schema)),
            sampling=pb.SamplingParams(max_tokens=40),
        ),
        timeout=120,
    )
    jsonschema.validate(json.loads(reply.text), schema)
    assert reply.finish_reason == pb.FINISH_REASON_STOP


async def test_cancel_aborts_the_engine_request(
    inference_stack: InferenceStack, stub: pb_grpc.InferenceServiceStub
) -> None:
    core = inference_stack.service.core
    engine = core.engines["engine-0"]
    call = stub.StreamGenerate(
        pb.StreamGenerateRequest(
            messages=convo("Count from 1 to 1000, one number per line."),
            sampling=pb.SamplingParams(max_tokens=1000, temperature=0.0),
        ),
        timeout=300,
    )
    first = await call.read()
    assert first.WhichOneof("event") == "text_delta"
    (request_id,) = list(core.live_requests)
    assert engine.has_request(request_id)
    call.cancel()
    for _ in range(200):
        if not engine.has_request(request_id):
            break
        await asyncio.sleep(0.05)
    assert not engine.has_request(request_id)
    assert request_id not in core.live_requests
    llm = engine._llm  # type: ignore[attr-defined]
    assert llm.get_num_unfinished_requests() == 0
    assert all(lane.in_flight == 0 for lane in core.lanes.values())


BAD = [
    (
        "unknown lane",
        pb.GenerateRequest(messages=convo("x"), lane=pb.LaneSelector(lane="nope")),
        grpc.StatusCode.NOT_FOUND,
        ["nope"],
    ),
    ("no messages", pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, ["messages"]),
    (
        "prompt longer than context",
        pb.GenerateRequest(messages=convo("hello " * 6000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["4096", "tokens"],
    ),
]


@pytest.mark.parametrize(("case", "req", "code", "needles"), BAD, ids=[b[0] for b in BAD])
async def test_bad_inputs_get_their_status(
    stub: pb_grpc.InferenceServiceStub,
    case: str,
    req: pb.GenerateRequest,
    code: grpc.StatusCode,
    needles: list[str],
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(req, timeout=60)
    assert err.value.code() == code
    for needle in needles:
        assert needle in (err.value.details() or "")


async def test_invalid_tool_schema_is_invalid_argument_naming_the_tool(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    bad = common_pb2.ToolSpec(
        name="refund_payment",
        description="refund",
        parameters_json_schema='{"type":"object","properties":{"a":{"type":7}}}',
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CallTools(
            pb.CallToolsRequest(messages=convo("refund me"), tools=[*specs(), bad]), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refund_payment" in (err.value.details() or "")


async def test_stream_interval_coalesces_deltas_without_changing_the_output(
    inference_stack: InferenceStack,
) -> None:
    """vLLM honours the per-request stream_interval the service sets: a collected generation
    (interval = max_tokens) arrives as its first token then the rest, with the same text and
    token count as the every-token stream of the same greedy generation."""
    from services.inference.engine import GenParams

    engine = inference_stack.service.core.engines["engine-0"]
    ids = engine.encode("<|im_start|>user\nCount from 1 to 30.<|im_end|>\n<|im_start|>assistant\n")

    async def run(interval: int) -> list[tuple[str, int]]:
        params = GenParams(max_tokens=24, temperature=0.0, stream_interval=interval)
        request_id = f"interval-{interval}-{uuid.uuid4().hex[:8]}"
        return [(d.text, d.new_tokens) async for d in engine.generate(ids, params, request_id)]

    every = await run(1)
    whole = await run(24)
    assert "".join(t for t, _ in whole) == "".join(t for t, _ in every)
    assert sum(n for _, n in whole) == sum(n for _, n in every) == 24
    assert len(whole) <= 2 < len(every)
