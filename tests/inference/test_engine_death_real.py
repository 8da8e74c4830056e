"""A real vLLM engine dying under the service: health flips, calls fail fast with UNAVAILABLE.

Uses its own inference server (not the session one, which other tests keep using) and kills
that server's engine-core process outright, as an OOM kill or a crashed kernel would.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import psutil
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from agentmesh.inference.v1 import inference_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.inference.config import InferenceSettings
from services.inference.service import SERVICE_NAME, InferenceService, lane_health_name
from shared.config import load_settings
from shared.server import GrpcServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _is_live_engine_core(child: psutil.Process) -> bool:
    """A running engine core; a zombie (exited, not yet reaped) or vanished one is not."""
    try:
        if child.status() == psutil.STATUS_ZOMBIE:
            return False
        return "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline())
    except psutil.Error:
        return False


def _engine_cores() -> set[int]:
    me = psutil.Process(os.getpid())
    return {child.pid for child in me.children(recursive=True) if _is_live_engine_core(child)}


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.usefixtures("without_shared_engine")
async def test_killed_engine_flips_health_and_calls_fail_fast() -> None:
    settings = load_settings(
        InferenceSettings,
        "inference",
        port=0,
        metrics_port=0,
        preset="embedded",
        hosted_lanes=["workhorse"],
        model_cache_dir=REPO / "var" / "models",
        cpu_kvcache_gib=1,
        grace_seconds=2.0,
    )
    before = _engine_cores()
    server = GrpcServer(InferenceService(settings), settings)
    await server.start()
    try:
        await server.wait_until_serving(600)
        ours = _engine_cores() - before
        assert len(ours) == 1, f"expected one new engine core, saw {ours}"
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            user = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Say hi.")]
            sampling = pb.SamplingParams(max_tokens=4)
            reply = await stub.Generate(
                pb.GenerateRequest(messages=user, sampling=sampling), timeout=120
            )
            assert reply.usage.completion_tokens > 0

            os.kill(ours.pop(), signal.SIGKILL)

            lane_name = lane_health_name("workhorse")
            status = None
            for _ in range(300):
                check = await health.Check(
                    health_pb2.HealthCheckRequest(service=lane_name), timeout=5
                )
                status = check.status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            overall = await health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
            )
            assert overall.status == health_pb2.HealthCheckResponse.NOT_SERVING

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(
                    pb.GenerateRequest(messages=user, sampling=sampling), timeout=30
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Traceback" not in (err.value.details() or "")
            lanes = await stub.ListLanes(pb.ListLanesRequest(), timeout=5)
            assert [lane.state for lane in lanes.lanes] == [pb.LANE_STATE_FAILED]
    finally:
        await server.stop(grace=2)
