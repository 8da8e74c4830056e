"""``agentmesh``: one entry point for operators and developers.

``agentmesh up`` runs the three services as child processes in one terminal with readable,
prefixed logs and stops them in order on Ctrl-C; ``agentmesh health`` asks each service's
standard health endpoint; ``agentmesh chat`` talks to the orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli import chat, replay
from shared.config import BootstrapSettings, child_process_environment

app = typer.Typer(help="agentmesh: a gRPC agent backend on vLLM.", no_args_is_help=True)
console = Console(stderr=True)
EMBEDDED_CONFIG = Path("config/embedded.yaml")


@dataclass(frozen=True)
class ServiceProcess:
    name: str
    module: str
    default_port: int
    colour: str


MESH = (
    ServiceProcess("tools", "services.tools", 50053, "green"),
    ServiceProcess("inference", "services.inference", 50052, "magenta"),
    ServiceProcess("orchestrator", "services.orchestrator", 50051, "cyan"),
)


def _terminate_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def _relay(name: str, colour: str, stream: asyncio.StreamReader) -> None:
    """Prefix each child log line with its service name."""
    width = max(len(s.name) for s in MESH)
    while line := await stream.readline():
        text = Text(f"{name:>{width}} | ", style=f"bold {colour}")
        text.append(line.decode(errors="replace").rstrip())
        console.print(text, highlight=False, soft_wrap=True)


async def _run_mesh(only: list[str], config: Path | None) -> int:
    processes: list[tuple[ServiceProcess, asyncio.subprocess.Process]] = []
    relays: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    child_env = child_process_environment(config)
    if config is not None:
        console.print(f"config: {config}")
    for spec in MESH:
        if only and spec.name not in only:
            continue
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            spec.module,
            env=child_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Own process group: a terminal's Ctrl-C reaches only `up`, which stops the
            # services in order; and a SIGTERM if `up` itself dies, so none is orphaned.
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        assert process.stdout is not None
        relays.append(asyncio.create_task(_relay(spec.name, spec.colour, process.stdout)))
        processes.append((spec, process))
        console.print(
            f"[bold {spec.colour}]started {spec.name}[/] "
            f"(pid {process.pid}, default port {spec.default_port})"
        )

    async def first_exit() -> None:
        await asyncio.wait(
            [asyncio.create_task(p.wait()) for _, p in processes],
            return_when=asyncio.FIRST_COMPLETED,
        )

    watcher = asyncio.create_task(first_exit())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([watcher, stopper], return_when=asyncio.FIRST_COMPLETED)
    crashed = [spec.name for spec, p in processes if p.returncode not in (None, 0)]
    console.print("[bold]stopping the mesh[/] (orchestrator first, then inference and tools)")
    for spec, process in reversed(processes):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                console.print(f"[red]{spec.name} did not stop in 60 s; killing it[/]")
                process.kill()
                await process.wait()
    for task in (*relays, watcher, stopper):
        task.cancel()
    codes = {spec.name: p.returncode for spec, p in processes}
    console.print(f"exit codes: {codes}")
    if crashed:
        console.print(f"[red]exited early: {', '.join(crashed)}[/]")
        return 1
    return 0 if all(code == 0 for code in codes.values()) else 1


@app.command()
def up(
    only: list[str] = typer.Option([], "--only", help="Start only these services (repeatable)."),
    config: Path | None = typer.Option(
        None,
        help="YAML config with inference/tools/orchestrator sections. Default: $AGENTMESH_CONFIG "
        f"if set, else {EMBEDDED_CONFIG} (the mesh on this machine with the embedded model).",
    ),
) -> None:
    """Start tools, inference and orchestrator in this terminal; Ctrl-C stops them cleanly."""
    import uvloop

    if config is None and BootstrapSettings().config is None and EMBEDDED_CONFIG.exists():
        config = EMBEDDED_CONFIG
    raise typer.Exit(uvloop.run(_run_mesh(only, config)))


async def _check_health(targets: dict[str, str]) -> dict[str, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    results: dict[str, str] = {}
    for name, target in targets.items():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
                results[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as error:
                results[name] = f"unreachable ({error.code().name})"
    return results


@app.command()
def health(
    host: str = typer.Option("127.0.0.1", help="Host the services listen on."),
) -> None:
    """Ask each service's grpc.health.v1 endpoint."""
    targets = {spec.name: f"{host}:{spec.default_port}" for spec in MESH}
    results = asyncio.run(_check_health(targets))
    table = Table("service", "target", "health")
    for name, status in results.items():
        style = "green" if status == "SERVING" else "red"
        table.add_row(name, targets[name], f"[{style}]{status}[/]")
    Console().print(table)
    if any(status != "SERVING" for status in results.values()):
        raise typer.Exit(1)


chat.register(app)
replay.register(app)

if __name__ == "__main__":
    app()
