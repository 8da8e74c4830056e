"""Pinning a whole process to CPU cores: every thread, in a child process of its own (so the
test process keeps its cores), as each thread reports it in /proc/self/task/*/status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.config import ServiceSettings
from shared.cpu_affinity import format_id_list, parse_id_list

REPO = Path(__file__).resolve().parents[2]
# The highest core this process may use: core 1 on this 2-core machine.
TARGET = max(os.sched_getaffinity(0))
ALL = format_id_list(os.sched_getaffinity(0))

# The child's line with its findings (JSON after it).
RESULT = "RESULT "
# Every thread's Cpus_allowed_list, by thread id.
READ_THREADS = textwrap.dedent(
    """
    import glob, os

    def thread_cpus(pid="self"):
        out = {}
        for path in glob.glob(f"/proc/{pid}/task/*/status"):
            fields = dict(
                line.split(":", 1) for line in open(path).read().splitlines() if ":" in line
            )
            out[int(path.split("/")[-2])] = fields["Cpus_allowed_list"].strip()
        return out
    """
)


def run_child(code: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")])}
    done = subprocess.run(
        [sys.executable, "-c", READ_THREADS + textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    assert len(lines) == 1, done.stdout + done.stderr
    result: dict[str, object] = json.loads(lines[0][len(RESULT) :])
    return result


def test_every_thread_of_the_process_is_pinned() -> None:
    result = run_child(
        f"""
        import json, threading
        from shared.cpu_affinity import pin_process

        stop = threading.Event()
        started = [threading.Thread(target=stop.wait) for _ in range(3)]
        for thread in started:
            thread.start()
        # A core that is not allowed here is skipped.
        applied = pin_process([{TARGET}, 4096])
        seen = thread_cpus()
        later = threading.Thread(target=stop.wait)
        later.start()
        after = thread_cpus()
        stop.set()
        print("RESULT " + json.dumps({{
            "applied": sorted(applied),
            "started": [t.native_id for t in started],
            "later": later.native_id,
            "seen": seen,
            "after": after,
        }}))
        """
    )
    assert result["applied"] == [TARGET]
    seen = {int(k): v for k, v in result["seen"].items()}  # type: ignore[attr-defined]
    # The main thread and the three started before the pin, each pinned.
    assert set(result["started"]) | {min(seen)} <= set(seen)  # type: ignore[arg-type]
    assert set(seen.values()) == {str(TARGET)}
    # A thread started after the pin inherits it.
    after = {int(k): v for k, v in result["after"].items()}  # type: ignore[attr-defined]
    assert after[result["later"]] == str(TARGET)  # type: ignore[index]


def test_the_placement_pins_this_process_and_the_engine_core_then_unpins() -> None:
    """ProcessPlacement around two engine starts: the engine core (a child) pinned with this
    process after a start; before the next start this process is back on every core (so the
    next engine's worker can bind its team there) while the first engine core stays."""
    result = run_child(
        f"""
        import json, subprocess, sys
        from services.inference.cpu_threads import ServiceCoresChoice
        from services.inference.placement import ProcessPlacement

        core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        placement = ProcessPlacement()
        placement.before_start()
        placement.after_start(ServiceCoresChoice(({TARGET},), "test"), [core.pid])
        pinned, core_pinned = thread_cpus(), thread_cpus(core.pid)
        placement.before_start()
        unpinned, core_after = thread_cpus(), thread_cpus(core.pid)
        placement.after_start(ServiceCoresChoice(({TARGET},), "test"), [])
        placement.restore()
        restored = thread_cpus()
        core.kill()
        print("RESULT " + json.dumps({{
            "pinned": sorted(set(pinned.values())),
            "core_pinned": sorted(set(core_pinned.values())),
            "unpinned": sorted(set(unpinned.values())),
            "core_after": sorted(set(core_after.values())),
            "restored": sorted(set(restored.values())),
        }}))
        """
    )
    assert result == {
        "pinned": [str(TARGET)],
        "core_pinned": [str(TARGET)],
        "unpinned": [ALL],
        "core_after": [str(TARGET)],
        "restored": [ALL],
    }


def test_the_bootstrap_pins_a_service_before_it_serves() -> None:
    result = run_child(
        f"""
        import json, os, signal
        from shared.config import ServiceSettings
        from shared.server import run_service
        from tests.shared.echo_service import EchoService

        class Reporting(EchoService):
            async def warm_up(self, health):
                # The server's threads exist by now (grpc's, the executor's).
                print("RESULT " + json.dumps({{"seen": sorted(set(thread_cpus().values())),
                                   "threads": len(thread_cpus())}}), flush=True)
                os.kill(os.getpid(), signal.SIGTERM)

        run_service(Reporting(), ServiceSettings(port=0, cpu_affinity="{TARGET}"))
        """
    )
    assert result["seen"] == [str(TARGET)]
    assert isinstance(result["threads"], int) and result["threads"] > 1


def test_the_setting_is_a_core_list() -> None:
    assert ServiceSettings().cpu_affinity == ""
    assert ServiceSettings().pinned_cores() is None
    assert ServiceSettings(cpu_affinity=" 1 ").pinned_cores() == [1]
    assert ServiceSettings(cpu_affinity="2-3,6").pinned_cores() == [2, 3, 6]
    # "auto" is the inference service's word only.
    for bad in ("auto", "1-", "all"):
        with pytest.raises(ValueError, match="not a core list"):
            ServiceSettings(cpu_affinity=bad)


def test_id_lists() -> None:
    assert format_id_list([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert format_id_list([3]) == "3"
    assert parse_id_list("0-2,5") == [0, 1, 2, 5]
    assert parse_id_list("0-2,5, 7-8") == [0, 1, 2, 5, 7, 8]
    with pytest.raises(ValueError):
        parse_id_list("all")
