"""The engine configured for its machine (dtype, KV cache, OpenMP binding): the pure choice,
and what ListLanes reports through the real gRPC server over the fake engine."""

from __future__ import annotations

from agentmesh.inference.v1 import inference_pb2 as pb

from services.inference.engine_setup import choose_engine_setup, not_started
from services.inference.kv_cache import MIB
from services.inference.machine import LogicalCpu, MachineFacts
from services.inference.memory_plan import GIB
from tests.inference.fakes import FakeEngineFactory, start_fake
from tests.inference.test_kv_cache import EMBEDDED, SMOLLM2_SHAPE

BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2"})
# A 16-core server with SMT (32 logical CPUs) and 64 GiB available, bf16 native.
BIG = MachineFacts(
    "cpu",
    cpu_flags=BF16,
    mem_available_bytes=64 * GIB,
    cpus=tuple(LogicalCpu(i, i % 16) for i in range(32)),
)
# A 2-core box with 4 GiB available and no native bf16 (float32).
SMALL = MachineFacts(
    "cpu",
    cpu_flags=AVX2,
    mem_available_bytes=4 * GIB,
    cpus=(LogicalCpu(0, 0), LogicalCpu(1, 1)),
)
BLOCK = 128  # tokens per KV block on vLLM's CPU build (the fake's too)

UNPINNED = (
    "auto: only 1 core off the OpenMP team, too few to hold the services and vLLM's engine "
    "core; left unpinned"
)


def test_the_setup_goes_into_the_engine_arguments() -> None:
    setup = choose_engine_setup(EMBEDDED, SMALL, SMOLLM2_SHAPE)
    args = setup.engine_args(EMBEDDED)
    assert args == {**EMBEDDED, "dtype": "float32", "kv_cache_memory_bytes": 1638 * MIB}
    assert setup.cpu_threads.bind == "0"
    assert setup.describe() == [
        f"computes in float32 on cpu: {setup.dtype.reason}",
        f"KV cache 1.60 GiB: {setup.kv_cache.reason}",
        f"OpenMP threads bound to 0: {setup.cpu_threads.reason}",
        f"process not pinned at engine start: {UNPINNED}",
    ]
    assert setup.service_cores.cores == ()
    # float32 KV: 46080 B per token.
    assert setup.kv_cache.bytes_per_token == 46080


def test_cuda_keeps_vllms_own_kv_sizing() -> None:
    gpu = MachineFacts("cuda", cuda_capability=(8, 9))
    setup = choose_engine_setup(EMBEDDED, gpu, SMOLLM2_SHAPE, kv_cache_gib=2.0)
    assert setup.engine_args(EMBEDDED) == {**EMBEDDED, "dtype": "bfloat16"}
    assert (setup.kv_cache.bytes, setup.cpu_threads.bind) == (0, "")
    assert setup.describe()[1:] == [
        f"KV cache: {setup.kv_cache.reason}",
        f"OpenMP threads not bound: {setup.cpu_threads.reason}",
        "process not pinned at engine start: cuda: no OpenMP team on the CPU",
    ]


async def test_list_lanes_reports_the_choices_for_a_big_machine() -> None:
    f = await start_fake(FakeEngineFactory(machine=BIG, kv_shape=SMOLLM2_SHAPE))
    try:
        lanes = (await f.stub.ListLanes(pb.ListLanesRequest(), timeout=5)).lanes
        assert len(lanes) == 4
        fill = 32 * 4096 * 23040
        for lane in lanes:
            assert (lane.dtype, lane.device) == ("bfloat16", "cpu")
            assert (lane.kv_cache_bytes, lane.kv_cache_tokens) == (fill, 32 * 4096)
            assert lane.kv_cache_reason == (
                "auto: what the engine can fill, 32 sequences x 4096 tokens x 23040 B = "
                "2.81 GiB (within 40% of 64.00 GiB available)"
            )
            assert lane.cpu_threads_bind == "16-29"
            assert lane.cpu_threads_reason == (
                "auto: OpenMP on 14 of 16 cores of NUMA node 0 (32 logical CPUs: one thread "
                "per physical core); 30-31 left to vLLM's scheduler and this service; "
                "process pinned to 14-15,30-31: auto: off the OpenMP team, with vLLM's "
                "engine core"
            )
    finally:
        await f.close()


async def test_list_lanes_reports_the_choices_for_a_small_machine() -> None:
    f = await start_fake(FakeEngineFactory(machine=SMALL, kv_shape=SMOLLM2_SHAPE))
    try:
        lanes = (await f.stub.ListLanes(pb.ListLanesRequest(), timeout=5)).lanes
        size = 1638 * MIB  # 40% of 4 GiB
        for lane in lanes:
            assert (lane.dtype, lane.kv_cache_bytes) == ("float32", size)
            assert lane.kv_cache_tokens == size // (46080 * BLOCK) * BLOCK
            assert lane.kv_cache_reason.startswith("auto: 40% of 4.00 GiB available")
            assert lane.cpu_threads_bind == "0"
            assert lane.cpu_threads_reason.endswith(
                "1 left to vLLM's scheduler and this service (no core of its own below 4 "
                "cores); process not pinned at engine start: auto: only 1 core off the OpenMP "
                "team, too few to hold the services and vLLM's engine core; left unpinned"
            )
    finally:
        await f.close()


async def test_list_lanes_reports_explicit_overrides() -> None:
    factory = FakeEngineFactory(
        machine=BIG, kv_shape=SMOLLM2_SHAPE, kv_cache_gib=2.0, cpu_threads_bind="0-3"
    )
    f = await start_fake(factory)
    try:
        lanes = (await f.stub.ListLanes(pb.ListLanesRequest(), timeout=5)).lanes
        for lane in lanes:
            assert (lane.kv_cache_bytes, lane.kv_cache_reason) == (
                2 * GIB,
                "set by cpu_kvcache_gib (2 GiB)",
            )
            assert lane.kv_cache_tokens == 2 * GIB // (23040 * BLOCK) * BLOCK
            assert (lane.cpu_threads_bind, lane.cpu_threads_reason) == (
                "0-3",
                "set by cpu_omp_threads_bind; process pinned to 4-15,20-31: auto: off the "
                "OpenMP team, with vLLM's engine core",
            )
    finally:
        await f.close()


def test_before_the_engine_started() -> None:
    setup = not_started({**EMBEDDED, "dtype": "bfloat16"})
    assert (setup.dtype.dtype, setup.kv_cache.bytes, setup.cpu_threads.bind) == ("bfloat16", 0, "")
    assert setup.kv_cache.reason == setup.cpu_threads.reason == "engine not started"
