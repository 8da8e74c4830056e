"""Admission that knows the engine (fake engine, real gRPC): one sequence budget per engine,
shared by its lanes; CallTools reserves every generation it may run at once; beyond the
budget RESOURCE_EXHAUSTED with a RetryInfo from the measured drain rate."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.inference.config import LanesConfig
from services.inference.lanes import SequenceBudget
from tests.inference.fakes import Fake, FakeEngineFactory, start_fake
from tests.inference.test_supervisor_fake import reason

LOOKUP = json.dumps({"type": "object", "properties": {"q": {"type": "string"}}})


def user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


def retry_ms(err: grpc.aio.AioRpcError) -> int:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return int(info.retry_delay.ToMilliseconds())
    raise AssertionError("no RetryInfo")


def budget_of(seqs: int):  # type: ignore[no-untyped-def]
    def configure(lanes: LanesConfig) -> None:
        for lane in lanes.lanes.values():  # same args on every lane: one shared engine
            lane.engine_args = {**lane.engine_args, "max_num_seqs": seqs}

    return configure


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    f = await start_fake(FakeEngineFactory(), budget_of(2))
    f.engine.script = lambda ids, p: "x" * 40
    f.engine.hold_after_first = asyncio.Event()
    yield f
    f.engine.hold_after_first.set()
    await f.close()


async def _held_stream(f: Fake, lane: str) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    call = f.stub.StreamGenerate(
        pb.StreamGenerateRequest(messages=user("a"), lane=pb.LaneSelector(lane=lane)),
        timeout=30,
    )
    first = await call.read()
    assert first.text_delta  # generating, and held after this delta
    return call


async def drain(call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_lanes_share_their_engines_sequence_budget(fake: Fake) -> None:
    budget = fake.service.core.budgets["engine-0"]
    assert len(fake.service.core.budgets) == 1 and budget.capacity == 2
    held = [await _held_stream(fake, "workhorse"), await _held_stream(fake, "planner")]
    assert budget.in_use == 2
    # A third lane on the same engine, far below its own cap: the engine is full.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fake.stub.Generate(
            pb.GenerateRequest(messages=user("b"), lane=pb.LaneSelector(lane="speed")),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(err.value) == "ENGINE_AT_CAPACITY"
    assert retry_ms(err.value) > 0
    assert len(fake.engine.requests) == 2  # the refused one never reached the engine
    registry = fake.service.metrics_registry
    assert registry.get_sample_value("agentmesh_inference_rejected_total", {"lane": "speed"}) == 1
    assert fake.engine.hold_after_first is not None
    fake.engine.hold_after_first.set()
    for call in held:
        await drain(call)
    assert budget.in_use == 0
    reply = await fake.stub.Generate(
        pb.GenerateRequest(messages=user("c"), lane=pb.LaneSelector(lane="speed")), timeout=10
    )
    assert reply.text == "x" * 40


async def test_call_tools_reserves_its_n_plus_one_generations() -> None:
    f = await start_fake(FakeEngineFactory(), budget_of(4))
    try:
        f.engine.script = lambda ids, p: "x" * 40
        f.engine.hold_after_first = asyncio.Event()
        budget = f.service.core.budgets["engine-0"]
        held = await _held_stream(f, "workhorse")
        tools = [
            common_pb2.ToolSpec(name=n, description="d", parameters_json_schema=LOOKUP)
            for n in ("kb_search", "crm_lookup", "billing_invoice")
        ]
        request = pb.CallToolsRequest(messages=user("x"), tools=tools, parallel=True, max_calls=3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await f.stub.CallTools(request, timeout=10)  # needs 3 + 1 of the 3 left
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(err.value) == "ENGINE_AT_CAPACITY"
        assert budget.in_use == 1
        f.engine.hold_after_first.set()
        await drain(held)
        f.engine.script = lambda ids, p: '["kb_search"]'
        f.engine.hold_after_first = None
        reply = await f.stub.CallTools(request, timeout=10)  # all four fit now
        assert reply.generations == 2  # the selection, then kb_search's arguments
        assert budget.in_use == 0
    finally:
        await f.close()


def test_the_retry_hint_follows_the_measured_drain_rate() -> None:
    budget = SequenceBudget("engine-0", capacity=4, in_use=4)
    # Eight sequences finished over the last 2 s: 3.5 per second after the first.
    budget._finished.extend([100.0 + i * 2 / 7 for i in range(8)])
    assert budget.drain_rate(now=102.0) == pytest.approx(3.5)
    fast = SequenceBudget("engine-0", capacity=4, in_use=4)
    fast._finished.extend([100.0 + i * 0.2 / 7 for i in range(8)])
    # Ten times the drain rate: a tenth of the wait, for the same shortfall.
    assert fast.drain_rate(now=100.2) == pytest.approx(35.0)


def test_callers_refused_just_before_push_a_new_callers_hint_back() -> None:
    budget = SequenceBudget("engine-0", capacity=2, in_use=2)
    now = time.monotonic()
    budget._finished.extend([now - 1.0 + i / 10 for i in range(11)])  # ~10 per second
    alone = budget.retry_after_s(1)
    budget._refused.extend([(now, 1)] * 5)  # five refused callers will come back first
    behind = budget.retry_after_s(1)
    assert behind == pytest.approx(6 * alone, rel=0.1)
