"""The process supervisor behind ``agentmesh up``: one child process per service, restarted
with back-off when it dies, all stopped in order on SIGTERM/SIGINT.

A crashed service (SIGKILL, an engine death's non-zero exit) is restarted on its own; the
others keep serving. Every start, exit and restart is said on the console. On stop the
services get SIGTERM in reverse start order (orchestrator, inference, tools), each its own
grace, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text


@dataclass(frozen=True)
class ChildSpec:
    """One supervised service: how to start it and how to label its log lines."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] | None = None
    colour: str = "white"


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``initial_s`` doubling up to ``max_s``; a child that stayed up for
    ``stable_s`` starts over at ``initial_s``."""

    initial_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0

    def next_delay(self, previous_s: float | None, uptime_s: float) -> float:
        if previous_s is None or uptime_s >= self.stable_s:
            return self.initial_s
        return min(self.max_s, previous_s * 2)


def terminate_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Child:
    """A supervised service's current process and its history."""

    spec: ChildSpec
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Runs the children until :meth:`stop`; restarts any that exits meanwhile."""

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        console: Console,
        backoff: Backoff | None = None,
        stop_grace_s: float = 60.0,
    ) -> None:
        self.children = [Child(spec) for spec in specs]
        self._console = console
        self._backoff = backoff or Backoff()
        self._stop_grace_s = stop_grace_s
        self._stopping = asyncio.Event()
        self._width = max((len(spec.name) for spec in specs), default=1)
        self._tasks: list[asyncio.Task[None]] = []

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.spec.name == name)

    def say(self, message: str) -> None:
        self._console.print(message, highlight=False)

    async def start(self) -> None:
        for child in self.children:
            await self._spawn(child)
            self._tasks.append(
                asyncio.create_task(self._keep(child), name=f"supervise-{child.spec.name}")
            )

    async def _spawn(self, child: Child) -> None:
        spec = child.spec
        process = await asyncio.create_subprocess_exec(
            *spec.argv,
            env=spec.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Own process group: a terminal's Ctrl-C reaches only `up`, which stops the
            # services in order; and a SIGTERM if `up` itself dies, so none is orphaned.
            start_new_session=True,
            preexec_fn=terminate_with_parent,
        )
        child.process = process
        what = "restarted" if child.restarts else "started"
        self.say(f"[bold {spec.colour}]{what} {spec.name}[/] (pid {process.pid})")

    async def _relay(self, child: Child) -> None:
        """Prefix each log line with the service name, until the process closes its output."""
        process = child.process
        assert process is not None and process.stdout is not None
        while line := await process.stdout.readline():
            text = Text(f"{child.spec.name:>{self._width}} | ", style=f"bold {child.spec.colour}")
            text.append(line.decode(errors="replace").rstrip())
            self._console.print(text, highlight=False, soft_wrap=True)

    async def _keep(self, child: Child) -> None:
        delay: float | None = None
        while True:
            process = child.process
            assert process is not None
            began = time.monotonic()
            relay = asyncio.create_task(self._relay(child))
            code = await process.wait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(relay, 5)
            relay.cancel()
            child.exits.append(code)
            if self._stopping.is_set():
                return
            delay = self._backoff.next_delay(delay, time.monotonic() - began)
            self.say(
                f"[bold red]{child.spec.name} exited ({describe_exit(code)}); "
                f"restarting in {delay:g}s[/] (restart {child.restarts + 1})"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            child.restarts += 1
            await self._spawn(child)

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM each running child in reverse order, wait its grace, then SIGKILL.
        Returns each child's last exit code."""
        self._stopping.set()
        for child in reversed(self.children):
            process = child.process
            if process is None or process.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self._stop_grace_s)
            except TimeoutError:
                self.say(f"[red]{child.spec.name} did not stop in {self._stop_grace_s:g}s[/]")
                process.kill()
                await process.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return {
            c.spec.name: (c.process.returncode if c.process is not None else None)
            for c in self.children
        }


async def run_until_signalled(supervisor: Supervisor, console: Console) -> int:
    """Start, supervise until SIGTERM/SIGINT, stop in order; 0 when every child stopped
    cleanly at the end."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await supervisor.start()
    await stop.wait()
    console.print("[bold]stopping the mesh[/] (orchestrator first, then inference and tools)")
    codes = await supervisor.stop()
    console.print(f"exit codes: {codes}")
    restarted = {c.spec.name: c.restarts for c in supervisor.children if c.restarts}
    if restarted:
        console.print(f"restarts: {restarted}")
    return 0 if all(code == 0 for code in codes.values()) else 1
