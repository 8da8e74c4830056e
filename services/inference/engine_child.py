"""The engine core dies with the inference service, whatever kills the service.

vLLM runs its engine core in a child process (its workers in grandchildren that watch the core
through a death pipe). Nothing makes the core notice that the service died: after a SIGKILL of
the service it lives on as an orphan holding the model's memory. Here the core's entry point is
wrapped so that, first thing in the child, it asks Linux for SIGKILL when its parent thread
exits (``prctl(PR_SET_PDEATHSIG)``); the workers then see their death pipe close and exit too.

The wrapper is a module-level function, so it pickles by reference under both ``fork`` and
``spawn`` start methods.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask for ``sig`` when the parent (thread) dies; True where the platform supports it."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0


def _bind_to_parent() -> None:
    import multiprocessing

    set_parent_death_signal()
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        # The parent died before the signal was armed: nothing will ever read our output.
        os._exit(1)


def run_engine_core_bound_to_parent(*args: Any, **kwargs: Any) -> None:
    """The engine core's entry point, in the child: bind its life to the parent (and its
    workers' lives to it), then run."""
    _bind_to_parent()
    from vllm.v1.engine.core import EngineCoreProc
    from vllm.v1.executor.multiproc_executor import WorkerProc

    if getattr(WorkerProc, "_agentmesh_original_main", None) is None:
        WorkerProc._agentmesh_original_main = WorkerProc.worker_main  # type: ignore[attr-defined]
        WorkerProc.worker_main = staticmethod(run_worker_bound_to_parent)  # type: ignore[method-assign,assignment]
    original = getattr(EngineCoreProc, "_agentmesh_original_run", EngineCoreProc.run_engine_core)
    original(*args, **kwargs)


def run_worker_bound_to_parent(*args: Any, **kwargs: Any) -> None:
    """A model worker's entry point (spawned by the engine core): it dies with the core at
    once instead of waiting for its death pipe's graceful shutdown."""
    _bind_to_parent()
    from vllm.v1.executor.multiproc_executor import WorkerProc

    original = getattr(WorkerProc, "_agentmesh_original_main", WorkerProc.worker_main)
    original(*args, **kwargs)


def install_parent_death_signal() -> None:
    """Make vLLM start its engine cores through :func:`run_engine_core_bound_to_parent`.

    Idempotent. vLLM builds ``Process(target=EngineCoreProc.run_engine_core)`` when an engine
    starts, so the wrapper has to sit on that attribute; the original stays reachable for the
    wrapper (in a spawned child the class is freshly imported and unpatched).
    """
    from vllm.v1.engine.core import EngineCoreProc

    if getattr(EngineCoreProc, "_agentmesh_original_run", None) is not None:
        return
    EngineCoreProc._agentmesh_original_run = EngineCoreProc.run_engine_core  # type: ignore[attr-defined]
    EngineCoreProc.run_engine_core = staticmethod(run_engine_core_bound_to_parent)  # type: ignore[method-assign,assignment]
