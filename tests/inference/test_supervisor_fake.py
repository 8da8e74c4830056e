"""The engine supervisor over a fake engine: lane state and health change together, whoever
notices a death first; a failed request is not a dead engine.

The watch tick is set to an hour here, so only the request path can notice the death.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.inference.service import SERVICE_NAME, lane_health_name
from tests.inference.fakes import Fake, FakeEngineFactory, start_fake

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
LANES = ["workhorse", "planner", "heavy", "speed"]


def user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


def reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("no ErrorInfo")


class DeathLog:
    def __init__(self) -> None:
        self.engines: list[str] = []

    def __call__(self, engine_id: str) -> None:
        self.engines.append(engine_id)


@pytest.fixture
def deaths() -> DeathLog:
    return DeathLog()


@pytest.fixture
async def fake(deaths: DeathLog) -> AsyncIterator[Fake]:
    f = await start_fake(FakeEngineFactory(), on_engine_death=deaths, watch_interval_s=3600)
    yield f
    await f.close()


async def _health(f: Fake, name: str) -> int:
    stub = health_pb2_grpc.HealthStub(f.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
    return int(reply.status)


@pytest.mark.parametrize("rpc", ["Generate", "StreamGenerate", "CallTools", "CountTokens"])
async def test_request_before_the_watch_tick_sees_not_serving_and_unavailable(
    fake: Fake, deaths: DeathLog, rpc: str
) -> None:
    assert await _health(fake, "") == SERVING
    fake.engine.dead = True  # the engine core died; the watch has not ticked (and won't)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if rpc == "Generate":
            await fake.stub.Generate(pb.GenerateRequest(messages=user("x")), timeout=5)
        elif rpc == "StreamGenerate":
            call = fake.stub.StreamGenerate(pb.StreamGenerateRequest(messages=user("x")), timeout=5)
            await call.read()
        elif rpc == "CallTools":
            spec = common_pb2.ToolSpec(
                name="kb_search", description="d", parameters_json_schema='{"type":"object"}'
            )
            await fake.stub.CallTools(
                pb.CallToolsRequest(messages=user("x"), tools=[spec]), timeout=5
            )
        else:
            await fake.stub.CountTokens(pb.CountTokensRequest(texts=["x"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # By the time the caller hears UNAVAILABLE, health already says so: per lane and overall.
    for lane in LANES:
        assert await _health(fake, lane_health_name(lane)) == NOT_SERVING, lane
    for overall in ["", SERVICE_NAME]:
        assert await _health(fake, overall) == NOT_SERVING, overall
    lanes = await fake.stub.ListLanes(pb.ListLanesRequest(), timeout=5)
    assert [lane.state for lane in lanes.lanes] == [pb.LANE_STATE_FAILED] * len(LANES)
    # The death hook (the process exit in production) ran once for the one engine.
    assert deaths.engines == ["engine-0"]


async def test_death_during_a_generation_fails_lanes_and_runs_the_hook_once(
    fake: Fake, deaths: DeathLog
) -> None:
    fake.engine.script = lambda ids, p: "y" * 64

    real_generate = fake.engine.generate

    async def dying(ids: list[int], params: object, request_id: str) -> AsyncIterator[object]:
        async for delta in real_generate(ids, params, request_id):  # type: ignore[arg-type]
            fake.engine.dead = True  # dies right after the first delta
            yield delta

    fake.engine.generate = dying  # type: ignore[assignment,method-assign]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fake.stub.Generate(pb.GenerateRequest(messages=user("x")), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(err.value) == "ENGINE_DEAD"
    assert await _health(fake, "") == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await fake.stub.Generate(pb.GenerateRequest(messages=user("x")), timeout=5)
    assert reason(again.value) == "LANE_FAILED"
    assert deaths.engines == ["engine-0"]


async def test_a_failed_generation_is_not_a_dead_engine(fake: Fake, deaths: DeathLog) -> None:
    fake.engine.fail_generations = 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fake.stub.Generate(pb.GenerateRequest(messages=user("x")), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(err.value) == "GENERATION_FAILED"
    assert "Traceback" not in (err.value.details() or "")
    # The lanes keep serving and the next request is answered.
    for name in ["", SERVICE_NAME, *(lane_health_name(lane) for lane in LANES)]:
        assert await _health(fake, name) == SERVING, name
    reply = await fake.stub.Generate(pb.GenerateRequest(messages=user("x")), timeout=5)
    assert reply.text == "hello from the fake engine"
    assert deaths.engines == []
    assert not fake.service.core.live_requests


async def test_the_watch_tick_alone_flips_an_idle_dead_engine(deaths: DeathLog) -> None:
    f = await start_fake(FakeEngineFactory(), on_engine_death=deaths, watch_interval_s=3600)
    try:
        f.engine.dead = True
        await f.service.core.board.sweep()  # what the watch does each tick
        assert await _health(f, "") == NOT_SERVING
        assert await _health(f, lane_health_name("speed")) == NOT_SERVING
        await f.service.core.board.sweep()
        assert deaths.engines == ["engine-0"]
    finally:
        await f.close()
