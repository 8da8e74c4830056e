"""Which CPU cores a process runs on: core lists, and pinning every thread of a process.

Core lists use vLLM's syntax (``"1"``, ``"2-3,6"``), the one ``VLLM_CPU_OMP_THREADS_BIND``
and every service's ``cpu_affinity`` setting take.

On Linux ``os.sched_setaffinity(0, cores)`` pins only the calling thread (the mask is a
thread's, inherited by the threads and processes it creates later). :func:`pin_process` pins
every thread a process has now (``/proc/<pid>/task``), so threads started before the pin (gRPC's,
a thread pool's, torch's) move too, and the ones started after inherit the mask.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("agentmesh.cpu_affinity")

PROC = Path("/proc")


def format_id_list(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (vLLM's core-list syntax)."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def parse_id_list(text: str) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]``; ValueError on anything else."""
    ids: set[int] = set()
    for part in text.split(","):
        start, sep, end = part.strip().partition("-")
        ids.update(range(int(start), int(end) + 1) if sep else [int(start)])
    return sorted(ids)


def supported() -> bool:
    """Whether this platform can pin a process (Linux)."""
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def current_cpus() -> frozenset[int]:
    """The cores the calling thread may run on (empty where the platform cannot say)."""
    return frozenset(os.sched_getaffinity(0)) if supported() else frozenset()


def thread_ids(pid: int | None = None) -> list[int]:
    """Every thread of process ``pid`` (default this one); just the process where ``/proc``
    does not list them."""
    task = PROC / ("self" if pid is None else str(pid)) / "task"
    try:
        return sorted(int(p.name) for p in task.iterdir() if p.name.isdigit())
    except OSError:
        return [pid if pid is not None else os.getpid()]


def pin_process(
    cores: Iterable[int],
    *,
    pid: int | None = None,
    allowed: Iterable[int] | None = None,
    what: str = "this process",
) -> frozenset[int]:
    """Pin every thread of process ``pid`` (default this one) to ``cores``, less any core not
    in ``allowed`` (default: the calling thread's cores, :func:`current_cpus`); says what it
    did. Returns the cores applied (empty: nothing changed)."""
    wanted = frozenset(cores)
    if not supported():
        log.info("cpu affinity: %s left alone (this platform cannot pin processes)", what)
        return frozenset()
    usable = frozenset(current_cpus() if allowed is None else allowed)
    applied = wanted & usable
    skipped = wanted - usable
    if skipped:
        log.warning(
            "cpu affinity: cores %s are not allowed here (allowed: %s); skipped",
            format_id_list(skipped),
            format_id_list(usable),
        )
    if not applied:
        log.warning("cpu affinity: %s left alone (no allowed core requested)", what)
        return frozenset()
    tids = thread_ids(pid)
    pinned = 0
    for tid in tids:
        try:
            os.sched_setaffinity(tid, applied)
            pinned += 1
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as error:
            log.warning("cpu affinity: thread %d of %s not pinned: %s", tid, what, error)
    log.info(
        "cpu affinity: %s (pid %d, %d threads) pinned to cores %s",
        what,
        os.getpid() if pid is None else pid,
        pinned,
        format_id_list(applied),
    )
    return applied
