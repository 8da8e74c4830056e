"""The ``agentmesh`` CLI's process handling: orphans, restarts with back-off, clean stops
(real child processes; the tools service is the one real service started)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from cli.main import mesh_children
from cli.supervisor import Backoff, ChildSpec, Supervisor
from services.inference.machine import LogicalCpu, MachineFacts

REPO = Path(__file__).resolve().parents[1]


async def test_a_service_started_by_up_dies_with_up(tmp_path: Path) -> None:
    """`up` killed outright (no orderly stop) must not leave its services orphaned."""
    pid_file = tmp_path / "child.pid"
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from cli.supervisor import terminate_with_parent
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            start_new_session=True,
            preexec_fn=terminate_with_parent,
        )
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")])}
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", parent, env=env, cwd=REPO)
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        await asyncio.sleep(0.05)
    child_pid = int(pid_file.read_text())
    process.kill()
    await process.wait()
    for _ in range(200):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        # A zombie still answers kill(0): reap it if it became ours, else wait for init.
        await asyncio.sleep(0.05)
    else:
        os.kill(child_pid, signal.SIGKILL)
        raise AssertionError("the child outlived its parent")


# ---- agentmesh up: the supervisor -----------------------------------------------------------


class Lines:
    """Reads a child's output line by line; tests await the line they need."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._stream = stream
        self.seen: list[str] = []

    async def until(self, pattern: str, timeout_s: float = 120) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.seen:
            if m := regex.search(line):
                self.seen.remove(line)
                return m

        async def read() -> re.Match[str]:
            while raw := await self._stream.readline():
                line = raw.decode(errors="replace")
                if m := regex.search(line):
                    return m
                self.seen.append(line)
            raise AssertionError(f"output ended before {pattern!r}: {self.seen[-20:]}")

        return await asyncio.wait_for(read(), timeout_s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _up_tools(tmp_path: Path) -> tuple[asyncio.subprocess.Process, Lines]:
    env = {
        **os.environ,
        "AGENTMESH_TOOLS_PORT": str(_free_port()),
        "AGENTMESH_TOOLS_METRICS_PORT": "0",
        "AGENTMESH_TOOLS_DATA_DIR": str(tmp_path),
        "AGENTMESH_TOOLS_SEED_DEMO_DATA": "false",
        "AGENTMESH_TOOLS_GRACE_SECONDS": "2",
        "COLUMNS": "200",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "up",
        "--only",
        "tools",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    return process, Lines(process.stdout)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_up_restarts_a_killed_service_and_stops_cleanly(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    up, out = await _up_tools(tmp_path)
    try:
        first = int((await out.until(r"started tools \(pid (\d+)\)"))[1])
        await out.until(r"tools \| .*tools listening on")
        os.kill(first, signal.SIGKILL)
        said = await out.until(r"tools exited \((.*?)\); restarting in ([\d.]+)s")
        assert said[1] == "killed by SIGKILL"
        assert float(said[2]) == 1.0  # the first back-off step
        second = int((await out.until(r"restarted tools \(pid (\d+)\)"))[1])
        assert second != first
        await out.until(r"tools \| .*tools listening on")
        up.send_signal(stop_signal)
        await out.until(r"stopping the mesh")
        assert await asyncio.wait_for(up.wait(), 60) == 0
        assert not _alive(second)
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()


# A child that serves until SIGTERM, then exits 0 (what every service does).
CHILD = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(1)\n"
)


class Sink:
    """A console's file: what the supervisor said, and an event per write."""

    def __init__(self) -> None:
        self.text = ""
        self.wrote = asyncio.Event()

    def write(self, data: str) -> int:
        self.text += data
        self.wrote.set()
        return len(data)

    def flush(self) -> None:
        pass

    async def until(self, needle: str, count: int = 1) -> None:
        while self.text.count(needle) < count:
            self.wrote.clear()
            await self.wrote.wait()


async def test_supervisor_restarts_only_the_crashed_child() -> None:
    specs = [ChildSpec(name, (sys.executable, "-c", CHILD)) for name in ("a", "b", "c")]
    sink = Sink()
    console = Console(file=sink, width=200)  # type: ignore[arg-type]
    supervisor = Supervisor(specs, console, Backoff(initial_s=0.01, max_s=0.01), stop_grace_s=10)
    await supervisor.start()
    try:
        await asyncio.wait_for(sink.until("| ready", 3), 30)  # every child handles SIGTERM
        pids = {c.spec.name: c.process.pid for c in supervisor.children if c.process}
        b = supervisor.child("b")
        os.kill(pids["b"], signal.SIGKILL)
        await asyncio.wait_for(sink.until("b | ready", 2), 30)
        assert "b exited (killed by SIGKILL); restarting in 0.01s" in sink.text
        assert b.restarts == 1 and b.exits == [-signal.SIGKILL]
        assert b.process is not None and b.process.pid != pids["b"]
        for name in ("a", "c"):  # the others never stopped
            other = supervisor.child(name)
            assert other.process is not None and other.process.pid == pids[name]
            assert other.process.returncode is None and other.restarts == 0
    finally:
        codes = await supervisor.stop()
    assert codes == {"a": 0, "b": 0, "c": 0}


def test_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(initial_s=1, max_s=5, stable_s=60)
    delays: list[float] = []
    delay: float | None = None
    for _ in range(5):
        delay = backoff.next_delay(delay, uptime_s=2)
        delays.append(delay)
    assert delays == [1, 2, 4, 5, 5]
    assert backoff.next_delay(5, uptime_s=61) == 1


# ---- agentmesh up: where tools and orchestrator run ----------------------------------------

TOOLS_VAR = "AGENTMESH_TOOLS_CPU_AFFINITY"
ORCHESTRATOR_VAR = "AGENTMESH_ORCHESTRATOR_CPU_AFFINITY"
EMBEDDED_YAML = REPO / "config" / "embedded.yaml"
TWO_CORES = MachineFacts("cpu", cpus=(LogicalCpu(0, 0), LogicalCpu(1, 1)))
FOUR_CORES = MachineFacts("cpu", cpus=tuple(LogicalCpu(i, i) for i in range(4)))


def affinity_env(children: list[ChildSpec]) -> dict[str, dict[str, str]]:
    placed = (TOOLS_VAR, ORCHESTRATOR_VAR)
    return {c.name: {k: v for k, v in (c.env or {}).items() if k in placed} for c in children}


def not_asked() -> MachineFacts:
    """Raises; mesh_placement reports what it raised as its summary, which the tests check."""
    raise AssertionError("the machine is read only when a service is placed")


@pytest.fixture
def no_placement_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the settings the placement reads comes from this test's environment."""
    for var in list(os.environ):
        if var.startswith("AGENTMESH_"):
            monkeypatch.delenv(var)


@pytest.mark.usefixtures("no_placement_env")
def test_up_starts_tools_and_orchestrator_off_the_engines_openmp_team() -> None:
    said: list[str] = []
    children = mesh_children([], EMBEDDED_YAML, facts=lambda: FOUR_CORES, say=said.append)
    assert affinity_env(children) == {
        "tools": {TOOLS_VAR: "2-3"},
        "inference": {},
        "orchestrator": {ORCHESTRATOR_VAR: "2-3"},
    }
    assert said == [
        "cpu placement: tools on 2-3, orchestrator on 2-3, inference on 2-3 once its engine "
        "started (its OpenMP team on the rest)"
    ]
    # Two cores: one off the team is too few to confine the services to.
    said.clear()
    children = mesh_children([], EMBEDDED_YAML, facts=lambda: TWO_CORES, say=said.append)
    assert affinity_env(children) == {"tools": {}, "inference": {}, "orchestrator": {}}
    assert said == ["cpu placement: none (no core off the engine's OpenMP team)"]


@pytest.mark.usefixtures("no_placement_env")
def test_up_leaves_alone_what_the_user_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(TOOLS_VAR, "0")
    said: list[str] = []
    children = mesh_children([], EMBEDDED_YAML, facts=lambda: FOUR_CORES, say=said.append)
    # The user's variable is in every child's environment (as any other of theirs).
    assert affinity_env(children) == {
        "tools": {TOOLS_VAR: "0"},
        "inference": {TOOLS_VAR: "0"},
        "orchestrator": {TOOLS_VAR: "0", ORCHESTRATOR_VAR: "2-3"},
    }
    assert said == [
        "cpu placement: orchestrator on 2-3, tools as configured, inference on 2-3 once its "
        "engine started (its OpenMP team on the rest)"
    ]
    # Set in the config file: the services read it themselves.
    monkeypatch.delenv(TOOLS_VAR)
    config = tmp_path / "mesh.yaml"
    config.write_text(
        "inference: {preset: embedded}\ntools: {cpu_affinity: '0'}\n"
        "orchestrator: {cpu_affinity: ''}\n"
    )
    said.clear()
    children = mesh_children([], config, facts=not_asked, say=said.append)
    assert affinity_env(children) == {"tools": {}, "inference": {}, "orchestrator": {}}
    # Nothing said: not_asked raising would have been reported as "cpu placement: none (...)".
    assert said == []


@pytest.mark.usefixtures("no_placement_env")
def test_up_places_nothing_on_a_gpu_or_without_its_inference_service() -> None:
    said: list[str] = []
    gpu = mesh_children([], EMBEDDED_YAML, facts=lambda: MachineFacts("cuda"), say=said.append)
    assert affinity_env(gpu) == {"tools": {}, "inference": {}, "orchestrator": {}}
    assert said == ["cpu placement: none (the engine runs on the GPU)"]
    # An inference service `up` does not start is not its to place around.
    said.clear()
    alone = mesh_children(
        ["tools", "orchestrator"], EMBEDDED_YAML, facts=not_asked, say=said.append
    )
    assert affinity_env(alone) == {"tools": {}, "orchestrator": {}}
    assert said == []
