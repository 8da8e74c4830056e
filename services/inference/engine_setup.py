"""An engine configured for the machine it starts on: dtype, KV cache size, thread binding,
and the cores the process hosting it runs on off the OpenMP team.

:func:`choose_engine_setup` is pure: the lane's engine arguments, the machine's facts, the
model's KV shape and the service's overrides in; the choices (each with its reason) out.
The engine logs them at start and ListLanes reports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from services.inference.cpu_threads import (
    CpuThreadsChoice,
    ServiceCoresChoice,
    choose_cpu_threads,
    choose_service_cores,
    engine_ranks,
)
from services.inference.dtype import DtypeChoice, choose_dtype
from services.inference.kv_cache import (
    KvCacheChoice,
    ModelKvShape,
    choose_kv_cache,
    kv_demand,
)
from services.inference.machine import MachineFacts
from services.inference.memory_plan import GIB
from shared.cpu_affinity import format_id_list


@dataclass(frozen=True)
class EngineSetup:
    dtype: DtypeChoice
    kv_cache: KvCacheChoice
    cpu_threads: CpuThreadsChoice
    service_cores: ServiceCoresChoice

    @property
    def device(self) -> str:
        return self.dtype.device

    def engine_args(self, lane_args: Mapping[str, Any]) -> dict[str, Any]:
        """The lane's engine arguments with the choices vLLM takes as arguments (the thread
        binding is an environment variable: config.apply_cpu_threads)."""
        args = {**lane_args, "dtype": self.dtype.dtype}
        if self.device != "cuda":
            args["kv_cache_memory_bytes"] = self.kv_cache.bytes
        return args

    def started(self, kv_tokens: int) -> EngineSetup:
        """With what the started engine reports (the tokens its KV cache holds)."""
        return replace(self, kv_cache=self.kv_cache.started(kv_tokens))

    def describe(self) -> list[str]:
        """One line per choice, for the start log."""
        kv = self.kv_cache
        threads = self.cpu_threads
        size = f" {kv.bytes / GIB:.2f} GiB" if kv.bytes else ""
        lines = [
            f"computes in {self.dtype.dtype} on {self.device}: {self.dtype.reason}",
            f"KV cache{size}: {kv.reason}",
        ]
        if threads.bind:
            lines.append(f"OpenMP threads bound to {threads.bind}: {threads.reason}")
        else:
            lines.append(f"OpenMP threads not bound: {threads.reason}")
        cores = self.service_cores
        if cores.cores:
            lines.append(f"process pinned to {format_id_list(cores.cores)}: {cores.reason}")
        else:
            lines.append(f"process not pinned at engine start: {cores.reason}")
        return lines

    @property
    def cpu_threads_reason(self) -> str:
        """ListLanes' cpu_threads_reason: the binding's reason, then where the rest runs."""
        if not self.service_cores.reason:
            return self.cpu_threads.reason
        return f"{self.cpu_threads.reason}; {self.describe()[-1]}"


def choose_engine_setup(
    engine_args: Mapping[str, Any],
    facts: MachineFacts,
    shape: ModelKvShape | None,
    kv_cache_gib: float | None = None,
    cpu_threads_bind: str = "auto",
    cpu_affinity: str = "auto",
) -> EngineSetup:
    """``kv_cache_gib``, ``cpu_threads_bind`` and ``cpu_affinity`` are the service's settings
    (None / "auto": chosen here)."""
    dtype = choose_dtype(engine_args.get("dtype"), facts)
    demand = kv_demand(engine_args, shape, dtype.dtype)
    kv = choose_kv_cache(
        facts.device, engine_args, kv_cache_gib, facts.available_memory_bytes, demand
    )
    ranks = engine_ranks(engine_args)
    threads = choose_cpu_threads(facts.device, cpu_threads_bind, facts.cpus, ranks)
    cores = choose_service_cores(cpu_affinity, threads, facts.cpus)
    return EngineSetup(dtype, kv, threads, cores)


def not_started(engine_args: Mapping[str, Any]) -> EngineSetup:
    """What ListLanes reports for an engine that has not started: the lane file's dtype, no
    choices yet."""
    why = "engine not started"
    return EngineSetup(
        DtypeChoice(str(engine_args.get("dtype", "auto")), "", why),
        KvCacheChoice(0, why),
        CpuThreadsChoice("", why),
        ServiceCoresChoice((), ""),
    )
