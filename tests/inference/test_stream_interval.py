"""Delta coalescing (vLLM's per-request stream_interval), over the fake engine: what the
service asks the engine for. tests/inference/test_engine_real.py checks that vLLM honours it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb

from services.inference.config import LanesConfig
from tests.inference.fakes import Fake, FakeEngineFactory, hermes_rest, start_fake


def user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    def configure(lanes: LanesConfig) -> None:
        lanes.lanes["workhorse"].sampling.stream_interval = 3

    f = await start_fake(FakeEngineFactory(), configure)
    yield f
    await f.close()


async def test_streams_use_the_lanes_stream_interval(fake: Fake) -> None:
    req = pb.StreamGenerateRequest(messages=user("hi"), lane=pb.LaneSelector(lane="workhorse"))
    events = [e async for e in fake.stub.StreamGenerate(req, timeout=10)]
    assert events[-1].WhichOneof("event") == "summary"
    ((_, params),) = fake.engine.requests
    assert params.stream_interval == 3


async def test_streams_of_other_lanes_send_every_token(fake: Fake) -> None:
    req = pb.StreamGenerateRequest(messages=user("hi"), lane=pb.LaneSelector(lane="speed"))
    [e async for e in fake.stub.StreamGenerate(req, timeout=10)]
    ((_, params),) = fake.engine.requests
    assert params.stream_interval == 1


async def test_collected_generations_get_first_token_then_the_rest_at_once(fake: Fake) -> None:
    """Generate and CallTools stream nothing: the engine sends the first token (for the time
    to first token) and then everything else in one delta."""
    await fake.stub.Generate(
        pb.GenerateRequest(
            messages=user("plan"),
            lane=pb.LaneSelector(lane="workhorse"),
            sampling=pb.SamplingParams(max_tokens=40),
        ),
        timeout=10,
    )
    fake.engine.script = lambda ids, p: hermes_rest({})
    schema = json.dumps({"type": "object", "properties": {}})
    reply = await fake.stub.CallTools(
        pb.CallToolsRequest(
            messages=user("go"),
            tools=[
                common_pb2.ToolSpec(name=n, description=n, parameters_json_schema=schema)
                for n in ("a", "b")
            ],
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NAMED, names=["a", "b"]),
            parallel=True,
            lane=pb.LaneSelector(lane="workhorse"),
        ),
        timeout=10,
    )
    assert [c.outcome for c in reply.calls] == [pb.PARSE_OUTCOME_OK] * 2
    intervals = [(p.max_tokens, p.stream_interval) for _, p in fake.engine.requests]
    assert len(intervals) == 3
    assert all(interval == max_tokens for max_tokens, interval in intervals)
