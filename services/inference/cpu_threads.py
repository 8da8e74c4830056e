"""The CPU cores the engine's OpenMP threads bind to, chosen for the machine it starts on.

vLLM's CPU build runs the model in a worker process whose OpenMP team it binds from
``VLLM_CPU_OMP_THREADS_BIND`` (``vllm/utils/ompmultiprocessing.py``, read by the engine core
process when it spawns the worker): a core list (``0-13``; ``|`` between ranks), ``nobind``
or ``auto``. Its ``auto`` takes, for rank N, the allowed CPUs of the N-th NUMA node, one
logical CPU per physical core on x86 (the last SMT sibling: siblings share the vector units)
and leaves the last ``VLLM_CPU_NUM_OF_RESERVED_CPU`` of them (default one per rank on x86
and ARM) out of the team for "the scheduler process": the engine core, which runs the
scheduler loop beside the worker. It leaves nothing for the process that embeds the engine:
here this service's event loop (gRPC, rendering, tokenising, the engine's output
processing), which then preempts OpenMP threads, and every parallel region waits for its
slowest thread.

``auto`` here is explicit: the cores vLLM's auto would take for one rank (the NUMA node of
the first allowed CPU, the last sibling of each physical core), less one for the engine
core's scheduler and, from :data:`SERVICE_CORE_MIN_CORES` cores on, one more for this
service. With 2 or 3 cores the service shares the scheduler's core instead: the scheduler
waits for the worker during each forward pass, so that core is mostly free when the
service needs it, while taking a second core would halve a 2-thread team (and leave none on
2 cores). The list goes to ``VLLM_CPU_OMP_THREADS_BIND``, so it is exactly what vLLM binds;
``VLLM_CPU_NUM_OF_RESERVED_CPU`` is only read by vLLM's own auto, so it is set only where we
leave the binding to vLLM (several ranks, or an unknown topology). An explicit
``cpu_omp_threads_bind`` wins.

The team is bound, nothing else is: the Linux scheduler keeps putting the service's event
loop, vLLM's engine core and the mesh's other processes on the team's cores, next to spinning
OpenMP threads. :func:`choose_service_cores` picks the allowed cores off the team (the
service's ``cpu_affinity`` "auto"): the service and its engine core are pinned there once the
engine started (services/inference/placement.py), and ``agentmesh up`` starts the tools and
orchestrator services there.

:func:`choose_cpu_threads` and :func:`choose_service_cores` are pure (facts in, choice and
reason out) so each machine kind is unit-tested.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.inference.machine import LogicalCpu
from shared.cpu_affinity import format_id_list, parse_id_list

AUTO = "auto"
NOBIND = "nobind"
# Cores left out of the OpenMP team per rank for vLLM's engine core (its scheduler loop).
SCHEDULER_CORES = 1
# From this many cores on (of the node the team runs on), one more is left for this service.
SERVICE_CORE_MIN_CORES = 4
# The services (and vLLM's engine core) are pinned off the team only when at least this many
# physical cores are left for them. With one (a 2-core machine: the team on core 0), three
# services and the engine core confined to core 1 ran slower at 10 sessions than left free
# to use core 0 between forward passes (the overhead bench: tool calls 232 vs 56 ms p50,
# the orchestrator's own work 530 vs 312 ms); one-thread query embeddings already keep the
# tool service off the team's back (tools.embedding_threads).
MIN_PLACED_CORES = 2


@dataclass(frozen=True)
class CpuThreadsChoice:
    # VLLM_CPU_OMP_THREADS_BIND: a core list, "nobind", or "auto" (vLLM binds); "" on CUDA.
    bind: str
    reason: str
    # VLLM_CPU_NUM_OF_RESERVED_CPU where vLLM binds itself ("auto"); None: leave it unset.
    reserved: int | None = None
    # OpenMP threads of the (first) rank; 0 where vLLM decides or nothing is bound.
    threads: int = 0


def choose_cpu_threads(
    device: str, requested: str, cpus: Sequence[LogicalCpu], ranks: int = 1
) -> CpuThreadsChoice:
    """The binding of an engine with ``ranks`` workers (tensor x pipeline parallel) on the
    allowed ``cpus``; ``requested`` is the service's ``cpu_omp_threads_bind``."""
    if device == "cuda":
        return CpuThreadsChoice("", "cuda: the model runs on the GPU (no OpenMP binding)")
    value = requested.strip()
    if value and value.lower() != AUTO:
        return CpuThreadsChoice(value, "set by cpu_omp_threads_bind", threads=_threads(value))
    if not cpus:
        return CpuThreadsChoice(AUTO, "auto: CPU topology unknown; vLLM binds the threads")
    node = cpus[0].node
    siblings: dict[tuple[int, int], list[int]] = {}
    for cpu in cpus:
        if cpu.node == node:
            siblings.setdefault(cpu.physical_core, []).append(cpu.id)
    team = sorted(max(ids) for ids in siblings.values())
    logical = sum(len(ids) for ids in siblings.values())
    cores = len(team)
    service = 1 if cores >= SERVICE_CORE_MIN_CORES else 0
    reserved = SCHEDULER_CORES * ranks + service
    if ranks > 1:
        return CpuThreadsChoice(
            AUTO,
            f"auto: {ranks} ranks; vLLM binds each to a NUMA node of its own, leaving "
            f"{reserved} cores to its scheduler" + (" and this service" if service else ""),
            reserved=reserved,
        )
    smt = f" ({logical} logical CPUs: one thread per physical core)" if logical > cores else ""
    if cores <= reserved:
        return CpuThreadsChoice(
            format_id_list(team),
            f"auto: OpenMP on the only core of NUMA node {node}, shared with vLLM's scheduler "
            "and this service",
            threads=cores,
        )
    kept, left = team[: cores - reserved], team[cores - reserved :]
    for_whom = (
        "vLLM's scheduler and this service"
        if service
        else f"vLLM's scheduler and this service (no core of its own below "
        f"{SERVICE_CORE_MIN_CORES} cores)"
    )
    return CpuThreadsChoice(
        format_id_list(kept),
        f"auto: OpenMP on {len(kept)} of {cores} cores of NUMA node {node}{smt}; "
        f"{format_id_list(left)} left to {for_whom}",
        threads=len(kept),
    )


def engine_ranks(engine_args: Mapping[str, Any]) -> int:
    """Workers of an engine: tensor x pipeline parallel (one OpenMP team each)."""
    return int(engine_args.get("tensor_parallel_size", 1)) * int(
        engine_args.get("pipeline_parallel_size", 1)
    )


@dataclass(frozen=True)
class ServiceCoresChoice:
    """Where the process hosting an engine (and vLLM's engine core) runs once it started."""

    # The cores both are pinned to; empty: nothing pinned at engine start.
    cores: tuple[int, ...]
    reason: str


def choose_service_cores(
    requested: str, threads: CpuThreadsChoice, cpus: Sequence[LogicalCpu]
) -> ServiceCoresChoice:
    """The cores off the engine's OpenMP team, for the service's ``cpu_affinity`` "auto".

    The OpenMP team is bound (an explicit core list), but nothing else is: the service's event
    loop, its threads and vLLM's engine core would otherwise land on the team's cores too and
    preempt it. So they go to the allowed ``cpus`` on a physical core the team does not use
    (an SMT sibling of a team core shares its vector units). Nothing where vLLM binds the
    team itself (``auto``, ``nobind``), on CUDA, or where no core is left. Any other
    ``requested`` value is the bootstrap's (an explicit list pinned the whole process before
    the engine started; empty leaves it alone).
    """
    value = requested.strip()
    if value.lower() != AUTO:
        why = (
            f"cpu_affinity {value} (set at start, engine included)"
            if value
            else ("cpu_affinity is empty")
        )
        return ServiceCoresChoice((), why)
    if not threads.bind:
        return ServiceCoresChoice((), "cuda: no OpenMP team on the CPU")
    if threads.bind.lower() in (AUTO, NOBIND):
        return ServiceCoresChoice(
            (), f"auto: vLLM places the OpenMP threads ({threads.bind.lower()})"
        )
    try:
        team = {i for rank in threads.bind.split("|") for i in parse_id_list(rank)}
    except ValueError:
        return ServiceCoresChoice((), f"auto: OpenMP binding {threads.bind!r} not a core list")
    busy = {cpu.physical_core for cpu in cpus if cpu.id in team}
    off = tuple(
        sorted(cpu.id for cpu in cpus if cpu.id not in team and cpu.physical_core not in busy)
    )
    if not off:
        return ServiceCoresChoice((), "auto: no allowed core is off the OpenMP team")
    physical = len({cpu.physical_core for cpu in cpus if cpu.id in off})
    if physical < MIN_PLACED_CORES:
        return ServiceCoresChoice(
            (),
            f"auto: only {physical} core off the OpenMP team, too few to hold the services and "
            "vLLM's engine core; left unpinned",
        )
    return ServiceCoresChoice(off, "auto: off the OpenMP team, with vLLM's engine core")


def _threads(bind: str) -> int:
    """OpenMP threads of the first rank of an explicit binding (0 for nobind or a list vLLM
    would refuse)."""
    if bind.lower() == NOBIND:
        return 0
    try:
        return len(parse_id_list(bind.split("|")[0]))
    except ValueError:
        return 0
