"""Where the process hosting the engines runs, off their OpenMP teams (``cpu_affinity: auto``).

The choice is :func:`services.inference.cpu_threads.choose_service_cores`; this module applies
it around each engine start (:class:`ProcessPlacement`) and computes it for the mesh's other
processes before any engine starts (:func:`cores_off_engine`, what ``agentmesh up`` gives the
tools and orchestrator services).

The pin comes after the engine started, not before: vLLM binds its OpenMP team through
``OMP_PLACES`` / ``GOMP_CPU_AFFINITY`` in the worker it spawns, and libgomp drops every place
outside the mask the worker inherited ("None of the places contain usable logical CPUs"), so
a service pinned off the team before the start would leave the team unbound, on the
service's cores. Started, the worker keeps its binding; this process and vLLM's engine core
(the scheduler loop, our child) are then pinned, every thread of each.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.inference.config import InferenceSettings
from services.inference.cpu_threads import (
    ServiceCoresChoice,
    choose_cpu_threads,
    choose_service_cores,
    engine_ranks,
)
from services.inference.machine import MachineFacts
from shared.cpu_affinity import current_cpus, pin_process


def cores_off_engine(facts: MachineFacts, settings: InferenceSettings) -> tuple[int, ...]:
    """The cores the inference service configured by ``settings`` pins itself (and its engine
    cores) to on the machine of ``facts``: those off every hosted engine's OpenMP team; ()
    where it pins nothing (CUDA, vLLM's own binding, no core left, cpu_affinity not auto)."""
    engines = {lane.engine_key(): lane.engine_args for lane in settings.load_lanes().hosted()}
    common: set[int] | None = None
    for args in engines.values():
        threads = choose_cpu_threads(
            facts.device, settings.cpu_omp_threads_bind, facts.cpus, engine_ranks(args)
        )
        cores = choose_service_cores(settings.cpu_affinity, threads, facts.cpus).cores
        common = set(cores) if common is None else common & set(cores)
        if not common:
            return ()
    return tuple(sorted(common or ()))


class ProcessPlacement:
    """This process around its engines' starts: back on every core it was allowed before an
    engine starts (so the engine's worker can bind its team anywhere there), pinned with the
    new engine core to the engine's service cores after it started. torch's thread count is
    left alone: the only torch work such a process does (the one-process agent's query
    embeddings) sets its own per call (tools.embedding_threads)."""

    def __init__(self) -> None:
        # The cores this process was allowed before the first engine start.
        self._allowed: frozenset[int] | None = None
        self._pinned = False

    @property
    def allowed(self) -> frozenset[int] | None:
        """The cores this process was allowed before its first engine start (None before)."""
        return self._allowed

    def before_start(self) -> None:
        if self._allowed is None:
            self._allowed = current_cpus()
        elif self._pinned:
            self._unpin()

    def after_start(self, choice: ServiceCoresChoice, engine_pids: Iterable[int]) -> None:
        """Pin this process and the engine's core processes to ``choice`` (nothing when it has
        no cores)."""
        if not choice.cores:
            return
        allowed = self._allowed if self._allowed is not None else current_cpus()
        if pin_process(choice.cores, allowed=allowed, what="this process"):
            self._pinned = True
        for pid in engine_pids:
            pin_process(choice.cores, pid=pid, allowed=allowed, what="vLLM's engine core")

    def restore(self) -> None:
        """Back on the cores this process was allowed before its first engine started."""
        if self._pinned:
            self._unpin()

    def _unpin(self) -> None:
        assert self._allowed is not None
        pin_process(self._allowed, allowed=self._allowed, what="this process (restored)")
        self._pinned = False
