"""``agentmesh``: one entry point for operators and developers.

``agentmesh up`` runs the three services as child processes in one terminal with readable,
prefixed logs, restarts one that crashes (with back-off, and says so) and stops them in order
on Ctrl-C or SIGTERM; ``agentmesh health`` asks each service's
standard health endpoint; ``agentmesh chat`` talks to the orchestrator.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli import chat, models, replay
from cli.placement import host_facts, mesh_placement
from cli.supervisor import ChildSpec, Supervisor, run_until_signalled
from services.inference.machine import MachineFacts
from shared.config import BootstrapSettings, child_process_environment

app = typer.Typer(help="agentmesh: a gRPC agent backend on vLLM.", no_args_is_help=True)
app.add_typer(models.app, name="models")
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


def mesh_children(
    only: list[str],
    config: Path | None,
    facts: Callable[[], MachineFacts] = host_facts,
    say: Callable[[str], None] | None = None,
) -> list[ChildSpec]:
    """The services `up` supervises, in start order; on a CPU engine's machine tools and
    orchestrator on the cores off its OpenMP team (cli/placement.py), said through ``say``."""
    env = child_process_environment(config)
    chosen = [spec for spec in MESH if not only or spec.name in only]
    placement = mesh_placement([spec.name for spec in chosen], env, facts)
    if placement.summary and say is not None:
        say(placement.summary)
    return [
        ChildSpec(
            spec.name,
            (sys.executable, "-m", spec.module),
            {**env, **placement.env.get(spec.name, {})},
            spec.colour,
        )
        for spec in chosen
    ]


async def _run_mesh(only: list[str], config: Path | None) -> int:
    if config is not None:
        console.print(f"config: {config}")
    children = mesh_children(only, config, say=lambda line: console.print(line, highlight=False))
    supervisor = Supervisor(children, console)
    return await run_until_signalled(supervisor, console)


@app.command()
def up(
    only: list[str] = typer.Option([], "--only", help="Start only these services (repeatable)."),
    config: Path | None = typer.Option(
        None,
        help="YAML config with inference/tools/orchestrator sections. Default: $AGENTMESH_CONFIG "
        f"if set, else {EMBEDDED_CONFIG} (the mesh on this machine with the embedded model).",
    ),
) -> None:
    """Start tools, inference and orchestrator in this terminal; a crashed one is restarted;
    Ctrl-C stops them cleanly."""
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
