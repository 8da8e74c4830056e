"""An engine configured for the machine it starts on: dtype, KV cache size, thread binding.

:func:`choose_engine_setup` is pure: the lane's engine arguments, the machine's facts, the
model's KV shape and the service's two overrides in; the three choices (each with its
reason) out. The engine logs them at start and ListLanes reports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from services.inference.cpu_threads import CpuThreadsChoice, choose_cpu_threads
from services.inference.dtype import DtypeChoice, choose_dtype
from services.inference.kv_cache import (
    GIB,
    KvCacheChoice,
    ModelKvShape,
    choose_kv_cache,
    kv_demand,
)
from services.inference.machine import MachineFacts


@dataclass(frozen=True)
class EngineSetup:
    dtype: DtypeChoice
    kv_cache: KvCacheChoice
    cpu_threads: CpuThreadsChoice

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
        return lines


def choose_engine_setup(
    engine_args: Mapping[str, Any],
    facts: MachineFacts,
    shape: ModelKvShape | None,
    kv_cache_gib: float | None = None,
    cpu_threads_bind: str = "auto",
) -> EngineSetup:
    """``kv_cache_gib`` and ``cpu_threads_bind`` are the service's settings (None / "auto":
    chosen here)."""
    dtype = choose_dtype(engine_args.get("dtype"), facts)
    demand = kv_demand(engine_args, shape, dtype.dtype)
    kv = choose_kv_cache(
        facts.device, engine_args, kv_cache_gib, facts.available_memory_bytes, demand
    )
    ranks = int(engine_args.get("tensor_parallel_size", 1)) * int(
        engine_args.get("pipeline_parallel_size", 1)
    )
    threads = choose_cpu_threads(facts.device, cpu_threads_bind, facts.cpus, ranks)
    return EngineSetup(dtype, kv, threads)


def not_started(engine_args: Mapping[str, Any]) -> EngineSetup:
    """What ListLanes reports for an engine that has not started: the lane file's dtype, no
    choices yet."""
    why = "engine not started"
    return EngineSetup(
        DtypeChoice(str(engine_args.get("dtype", "auto")), "", why),
        KvCacheChoice(0, why),
        CpuThreadsChoice("", why),
    )
