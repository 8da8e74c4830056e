"""The OpenMP thread binding chosen for the machine: pure over the allowed CPUs' topology."""

from __future__ import annotations

import os

import pytest

from services.inference.config import (
    InferenceSettings,
    apply_cpu_threads,
    apply_engine_environment,
)
from services.inference.cpu_threads import (
    CpuThreadsChoice,
    choose_cpu_threads,
    format_id_list,
    parse_id_list,
)
from services.inference.machine import LogicalCpu


def flat(n: int, node: int = 0, first: int = 0) -> list[LogicalCpu]:
    """``n`` cores without SMT."""
    return [LogicalCpu(first + i, first + i, 0, node) for i in range(n)]


def smt(cores: int) -> list[LogicalCpu]:
    """``cores`` cores with two siblings each, numbered as Linux does (i and i + cores)."""
    return [LogicalCpu(i, i % cores, 0, 0) for i in range(2 * cores)]


def test_two_cores_keep_one_for_the_scheduler_and_the_service() -> None:
    choice = choose_cpu_threads("cpu", "auto", flat(2))
    assert (choice.bind, choice.threads, choice.reserved) == ("0", 1, None)
    assert choice.reason == (
        "auto: OpenMP on 1 of 2 cores of NUMA node 0; 1 left to vLLM's scheduler and this "
        "service (no core of its own below 4 cores)"
    )


def test_sixteen_cores_keep_one_for_the_scheduler_and_one_for_the_service() -> None:
    choice = choose_cpu_threads("cpu", "auto", flat(16))
    assert (choice.bind, choice.threads) == ("0-13", 14)
    assert choice.reason == (
        "auto: OpenMP on 14 of 16 cores of NUMA node 0; 14-15 left to vLLM's scheduler and "
        "this service"
    )


def test_smt_siblings_get_no_thread_of_their_own() -> None:
    # 16 cores, 32 logical CPUs: the last sibling of each core (16-31), as vLLM's auto picks.
    choice = choose_cpu_threads("cpu", "auto", smt(16))
    assert (choice.bind, choice.threads) == ("16-29", 14)
    assert "(32 logical CPUs: one thread per physical core)" in choice.reason
    assert "30-31 left to vLLM's scheduler and this service" in choice.reason


def test_the_service_core_starts_at_four_cores() -> None:
    assert choose_cpu_threads("cpu", "auto", flat(3)).bind == "0-1"
    four = choose_cpu_threads("cpu", "auto", flat(4))
    assert (four.bind, four.threads) == ("0-1", 2)
    assert four.reason.endswith("2-3 left to vLLM's scheduler and this service")


def test_one_core_is_shared() -> None:
    choice = choose_cpu_threads("cpu", "auto", flat(1))
    assert (choice.bind, choice.threads) == ("0", 1)
    assert choice.reason == (
        "auto: OpenMP on the only core of NUMA node 0, shared with vLLM's scheduler and this "
        "service"
    )


def test_the_team_stays_on_the_first_allowed_numa_node() -> None:
    two_nodes = flat(8, node=0) + flat(8, node=1, first=8)
    assert choose_cpu_threads("cpu", "auto", two_nodes).bind == "0-5"
    # A process confined to node 1 (its affinity) binds there.
    assert choose_cpu_threads("cpu", "auto", flat(8, node=1, first=8)).bind == "8-13"


def test_an_explicit_binding_wins() -> None:
    for machine in (flat(2), flat(16), []):
        choice = choose_cpu_threads("cpu", "0-3", machine)
        assert choice == CpuThreadsChoice("0-3", "set by cpu_omp_threads_bind", threads=4)
    assert choose_cpu_threads("cpu", "nobind", flat(16)).threads == 0
    assert choose_cpu_threads("cpu", "0-1|2-3", flat(4)).threads == 2


def test_where_vllm_binds_itself() -> None:
    ranks = choose_cpu_threads("cpu", "auto", flat(16), ranks=2)
    assert (ranks.bind, ranks.reserved) == ("auto", 3)
    assert "2 ranks" in ranks.reason
    unknown = choose_cpu_threads("cpu", "auto", [])
    assert (unknown.bind, unknown.reserved) == ("auto", None)
    assert unknown.reason == "auto: CPU topology unknown; vLLM binds the threads"


def test_cuda_binds_nothing() -> None:
    choice = choose_cpu_threads("cuda", "auto", flat(16))
    assert choice.bind == "" and choice.reason.startswith("cuda:")


def test_id_lists() -> None:
    assert format_id_list([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert format_id_list([3]) == "3"
    assert parse_id_list("0-2,5, 7-8") == [0, 1, 2, 5, 7, 8]
    with pytest.raises(ValueError):
        parse_id_list("all")


def test_the_environment_vllm_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every variable written is restored after the test (setenv records the original).
    written = ("VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    for key in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", *written):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    apply_engine_environment(InferenceSettings(), "cpu")
    # The legacy size would override each engine's kv_cache_memory_bytes: gone.
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    apply_cpu_threads(choose_cpu_threads("cpu", "auto", flat(16)))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-13"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
    apply_cpu_threads(choose_cpu_threads("cpu", "auto", flat(16), ranks=2))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "3"
    apply_cpu_threads(choose_cpu_threads("cuda", "auto", flat(16)))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "auto"  # untouched on CUDA
