"""Admission on the real engine (the session's shared one, embedded preset: four lanes on one
engine with max_num_seqs 32): more concurrent work than the engine's sequence budget gets
RESOURCE_EXHAUSTED with a RetryInfo, even on a lane far below its own cap, and once the
streams end the engine tracks no request."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from agentmesh.inference.v1 import inference_pb2_grpc as pb_grpc

from tests.fixtures_inference import InferenceStack
from tests.inference.test_admission_fake import retry_ms
from tests.inference.test_supervisor_fake import reason

pytestmark = pytest.mark.slow

# Every answer is exactly 200 characters (tens of tokens): each stream is provably still
# generating right after its first delta.
LONG = json.dumps({"type": "string", "minLength": 200, "maxLength": 200})


def _ask(lane: str) -> pb.StreamGenerateRequest:
    return pb.StreamGenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Describe a cat.")],
        lane=pb.LaneSelector(lane=lane),
        sampling=pb.SamplingParams(max_tokens=300, temperature=0.0),
        response_format=pb.ResponseFormat(json_schema=LONG),
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_work_beyond_the_engine_budget_is_refused_with_a_retry_hint(
    inference_stack: InferenceStack,
) -> None:
    core = inference_stack.service.core
    engine = core.engines["engine-0"]
    budget = core.budgets["engine-0"]
    assert budget.capacity == 32  # the engine's max_num_seqs, shared by all four lanes
    async with grpc.aio.insecure_channel(inference_stack.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        lanes = ["workhorse", "speed"] * (budget.capacity // 2)
        calls = [stub.StreamGenerate(_ask(lane), timeout=600) for lane in lanes]
        try:
            for call in calls:
                first = await call.read()
                assert first.WhichOneof("event") == "text_delta"
            assert budget.in_use == budget.capacity
            # planner has none of its 16 slots in use: the engine's budget is what refuses.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                extra = stub.StreamGenerate(_ask("planner"), timeout=60)
                await extra.read()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason(err.value) == "ENGINE_AT_CAPACITY"
            assert retry_ms(err.value) > 0
            assert engine.unfinished_requests() == budget.capacity  # type: ignore[attr-defined]
        finally:
            for call in calls:
                call.cancel()
        for _ in range(400):
            if engine.unfinished_requests() == 0 and budget.in_use == 0:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        assert engine.unfinished_requests() == 0  # type: ignore[attr-defined]
        assert budget.in_use == 0 and not core.live_requests
