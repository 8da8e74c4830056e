"""The OpenMP thread binding chosen for the machine, and the cores the rest of the mesh runs
on off its team: pure over the allowed CPUs' topology."""

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
    ServiceCoresChoice,
    choose_cpu_threads,
    choose_service_cores,
)
from services.inference.machine import LogicalCpu, MachineFacts
from services.inference.placement import cores_off_engine

UNPINNED = (
    "auto: only 1 core off the OpenMP team, too few to hold the services and vLLM's engine "
    "core; left unpinned"
)


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


# ---- the cores off the OpenMP team (cpu_affinity "auto") ----------------------------------


OFF_TEAM = "auto: off the OpenMP team, with vLLM's engine core"


def off_team(cpus: list[LogicalCpu], bind: str = "auto") -> tuple[int, ...]:
    """The service's cores where the team is chosen for ``cpus`` (or bound to ``bind``)."""
    threads = choose_cpu_threads("cpu", bind, cpus)
    return choose_service_cores("auto", threads, cpus).cores


def test_two_and_three_cores_leave_the_services_unpinned() -> None:
    """One core off the team is too few for the services and vLLM's engine core: confined
    there, they ran slower under load than free to use the team's core between passes."""
    for cores in (2, 3):
        threads = choose_cpu_threads("cpu", "auto", flat(cores))
        assert choose_service_cores("auto", threads, flat(cores)) == ServiceCoresChoice(
            (),
            UNPINNED,
        )
    # An explicit team that leaves two cores free: those two.
    threads = choose_cpu_threads("cpu", "0", flat(3))
    assert choose_service_cores("auto", threads, flat(3)) == ServiceCoresChoice((1, 2), OFF_TEAM)


def test_four_and_sixteen_cores() -> None:
    assert off_team(flat(4)) == (2, 3)
    assert off_team(flat(16)) == (14, 15)


def test_smt_siblings_of_the_team_stay_off_limits() -> None:
    # Team 16-29 (one sibling of cores 0-13): the service gets both siblings of cores 14-15,
    # none of the team's own cores' siblings (0-13 share vector units with the team).
    assert off_team(smt(16)) == (14, 15, 30, 31)


def test_a_cpuset_restricts_the_allowed_cores() -> None:
    # A container allowed CPUs 4-7 of a bigger machine: team 4-5, the service 6-7.
    assert off_team(flat(4, first=4)) == (6, 7)
    # Other NUMA nodes are off the team too.
    assert off_team(flat(8, node=0) + flat(8, node=1, first=8)) == (6, 7, *range(8, 16))


def test_an_explicit_team_leaves_the_rest() -> None:
    assert off_team(flat(8), "0-3") == (4, 5, 6, 7)
    assert off_team(flat(8), "0-1|4-5") == (2, 3, 6, 7)
    # Cores of the list outside the allowed set change nothing.
    assert off_team(flat(4), "2-9") == (0, 1)


def test_no_core_left_pins_nothing() -> None:
    assert off_team(flat(1)) == ()
    assert off_team(flat(4), "0-3") == ()
    threads = choose_cpu_threads("cpu", "0-3", flat(4))
    assert choose_service_cores("auto", threads, flat(4)).reason == (
        "auto: no allowed core is off the OpenMP team"
    )


def test_cuda_and_vllms_own_binding_pin_nothing() -> None:
    cuda = choose_service_cores("auto", choose_cpu_threads("cuda", "auto", flat(16)), flat(16))
    assert cuda == ServiceCoresChoice((), "cuda: no OpenMP team on the CPU")
    assert off_team(flat(16), "nobind") == ()
    ranks = choose_cpu_threads("cpu", "auto", flat(16), ranks=2)
    assert choose_service_cores("auto", ranks, flat(16)) == ServiceCoresChoice(
        (), "auto: vLLM places the OpenMP threads (auto)"
    )


def test_an_affinity_set_by_the_user_is_the_bootstraps() -> None:
    threads = choose_cpu_threads("cpu", "auto", flat(2))
    assert choose_service_cores("", threads, flat(2)) == ServiceCoresChoice(
        (), "cpu_affinity is empty"
    )
    assert choose_service_cores("1", threads, flat(2)).cores == ()


def test_cores_off_engine_for_the_mesh() -> None:
    """What `agentmesh up` gives tools and orchestrator: the inference service's own cores."""
    two = MachineFacts("cpu", cpus=tuple(flat(2)))
    assert cores_off_engine(two, InferenceSettings(preset="embedded")) == ()
    four = MachineFacts("cpu", cpus=tuple(flat(4)))
    assert cores_off_engine(four, InferenceSettings(preset="embedded")) == (2, 3)
    sixteen = MachineFacts("cpu", cpus=tuple(smt(16)))
    assert cores_off_engine(sixteen, InferenceSettings(preset="embedded")) == (14, 15, 30, 31)
    explicit = InferenceSettings(preset="embedded", cpu_omp_threads_bind="0-11")
    assert cores_off_engine(sixteen, explicit) == (12, 13, 14, 15, 28, 29, 30, 31)
    assert cores_off_engine(MachineFacts("cuda"), InferenceSettings(preset="embedded")) == ()
    assert cores_off_engine(MachineFacts("cpu", cpus=tuple(flat(1))), InferenceSettings()) == ()
    for opted_out in ("", "0-1"):
        settings = InferenceSettings(preset="embedded", cpu_affinity=opted_out)
        assert cores_off_engine(four, settings) == ()


def test_cpu_affinity_settings() -> None:
    assert InferenceSettings().cpu_affinity == "auto"
    assert InferenceSettings().pinned_cores() is None
    assert InferenceSettings(cpu_affinity="2-3,6").pinned_cores() == [2, 3, 6]
    with pytest.raises(ValueError, match="not a core list"):
        InferenceSettings(cpu_affinity="all")


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
