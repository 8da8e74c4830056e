"""The engine supervisor on the real vLLM engine: no engine process outlives the service or a
failed start, and an engine death ends the service with a non-zero exit (its supervisor
restarts it).

Each test starts its own engine (in ``python -m services.inference`` or in this process), so it
runs after the session's shared engine stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from agentmesh.inference.v1 import inference_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.inference.__main__ import ENGINE_DIED_EXIT
from services.inference.config import InferenceSettings, apply_engine_environment
from services.inference.engine import VllmEngine
from services.inference.model_prep import resolve_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "var" / "models"
START_S = 600.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # a zombie or a process that just went
        return ""


def _is_engine_core(proc: psutil.Process) -> bool:
    try:
        return "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


async def _engine_core_of(root: psutil.Process, timeout_s: float = START_S) -> psutil.Process:
    """The engine-core process under ``root`` once it exists (no event to await: poll)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            cores = [p for p in root.children(recursive=True) if _is_engine_core(p)]
        except psutil.NoSuchProcess:
            cores = []
        if cores:
            return cores[0]
        await asyncio.sleep(0.2)
    raise AssertionError("no engine core appeared")


def _gone(procs: list[psutil.Process], timeout_s: float = 60) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return list(alive)


async def _spawn_service(port: int) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "AGENTMESH_INFERENCE_PORT": str(port),
        "AGENTMESH_INFERENCE_HOST": "127.0.0.1",
        "AGENTMESH_INFERENCE_METRICS_PORT": "0",
        "AGENTMESH_INFERENCE_PRESET": "embedded",
        "AGENTMESH_INFERENCE_HOSTED_LANES": '["workhorse"]',
        "AGENTMESH_INFERENCE_MODEL_CACHE_DIR": str(MODELS),
        "AGENTMESH_INFERENCE_CPU_KVCACHE_GIB": "1",
        "AGENTMESH_INFERENCE_GRACE_SECONDS": "2",
    }
    env.pop("AGENTMESH_CONFIG", None)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.inference",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _until_serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=START_S, wait_for_ready=True
        )
        async for reply in watch:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return
    raise AssertionError("never SERVING")


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.usefixtures("without_shared_engine")
async def test_sigkill_of_the_service_takes_its_engine_processes_with_it() -> None:
    process = await _spawn_service(_free_port())
    root = psutil.Process(process.pid)
    try:
        core = await _engine_core_of(root)
        tree = root.children(recursive=True)
        assert core in tree
        os.kill(process.pid, signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
        assert _gone(tree) == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.usefixtures("without_shared_engine")
async def test_engine_death_exits_the_service_non_zero_without_orphans() -> None:
    port = _free_port()
    process = await _spawn_service(port)
    root = psutil.Process(process.pid)
    try:
        await asyncio.wait_for(_until_serving(f"127.0.0.1:{port}"), START_S)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            msg = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Say hi.")]
            reply = await stub.Generate(
                pb.GenerateRequest(messages=msg, sampling=pb.SamplingParams(max_tokens=2)),
                timeout=120,
            )
            assert reply.usage.completion_tokens > 0
        tree = root.children(recursive=True)
        cores = [p for p in tree if _is_engine_core(p)]
        assert len(cores) == 1
        cores[0].kill()  # an OOM kill of the engine core
        assert await asyncio.wait_for(process.wait(), 120) == ENGINE_DIED_EXIT
        assert _gone(tree) == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.usefixtures("without_shared_engine")
async def test_an_abandoned_start_leaves_no_engine_process() -> None:
    """A start timeout cancels the start the same way: the spawned core is killed, the build
    unwinds, and the engine reports what it killed."""
    settings = InferenceSettings(port=0, metrics_port=0, cpu_kvcache_gib=1)
    apply_engine_environment(settings, "cpu")
    spec = settings.load_lanes().lanes["workhorse"]
    engine = VllmEngine(
        "engine-test",
        spec.model,
        spec.engine_args,
        resolve=lambda ref: resolve_model(ref, MODELS),
        start_timeout_s=START_S,
        kv_cache_gib=settings.kvcache_gib(),
    )
    me = psutil.Process()
    before = set(me.children(recursive=True))
    start = asyncio.create_task(engine.start())
    core = await _engine_core_of(me)
    assert core not in before
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert core.pid in engine.killed_on_failed_start
    assert _gone([core]) == []
    # Whatever else the attempt spawned is gone too; multiprocessing's resource tracker (one
    # per process, shared by every later start) is not the engine's.
    left = [
        p
        for p in me.children(recursive=True)
        if p not in before and "resource_tracker" not in _cmdline(p)
    ]
    assert _gone(left) == []
