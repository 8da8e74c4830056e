"""``agentmesh replay``: re-run recorded turns against a candidate lane, with the recorded tool
results fed back (no live tools), and score tool selection.

    agentmesh replay --traces tests/data/gold_turns.jsonl --lane workhorse --embedded

Prints the scores, writes a JSON report, exports the F1 to a textfile-collector file or a
Pushgateway when configured (``replay.textfile_path`` / ``replay.pushgateway_url``), and exits
1 when ``--min-f1`` is given and not reached.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

EMBEDDED_CONFIG = Path("config/embedded.yaml")


def _scores_table(report: dict[str, Any]) -> Table:
    table = Table("score", "precision", "recall", "F1", title=f"replay on {report['lane']}")
    scores = report["scores"]
    for label, key in (("by name", "by_name"), ("by name + arguments", "by_name_and_arguments")):
        row = scores[key]
        table.add_row(label, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}")
    table.add_row("abstention (no-tool turns)", "", "", f"{scores['abstention_accuracy']:.3f}")
    table.add_row("parse-failure rate", "", "", f"{report['parse_failure_rate']:.3f}")
    lat = report["latency_s"]
    table.add_row("latency p50 / p95 (s)", "", "", f"{lat['p50']:.1f} / {lat['p95']:.1f}")
    return table


async def _run(
    traces: Path,
    lane: str,
    inference: str | None,
    embedded: bool,
    config: Path | None,
    limit: int,
    console: Console,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    import grpc

    from services.orchestrator.clients import GrpcInference
    from services.orchestrator.loop.policy import AgentProfile, Caps
    from services.orchestrator.replay.records import read_records
    from services.orchestrator.replay.runner import demo_registry, replay
    from services.orchestrator.replay.settings import ReplaySettings
    from shared.config import load_settings, read_config_section

    settings = load_settings(ReplaySettings, "replay", config, **overrides)
    profile = AgentProfile(**(read_config_section(config, "orchestrator").get("profile") or {}))
    records = read_records(traces)[: limit or None]
    server = None
    target = inference or settings.inference_target
    if embedded:
        from services.inference.config import InferenceSettings
        from services.inference.service import InferenceService
        from shared.server import GrpcServer

        inf = load_settings(InferenceSettings, "inference", config, host="127.0.0.1", port=0)
        inf = inf.model_copy(update={"metrics_port": 0})
        server = GrpcServer(InferenceService(inf), inf)
        console.print("starting the embedded inference service ...")
        await server.start()
        await server.wait_until_serving(900)
        target = server.address
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            with Progress(
                TextColumn("[bold]replay[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[last]}"),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                task = progress.add_task("replay", total=len(records), last="")

                def on_turn(result: Any) -> None:
                    mark = "ok" if result.name_hits == len(result.expected) else "miss"
                    progress.update(task, advance=1, last=f"{result.id}: {mark}")
                    if not console.is_terminal:  # logs: one line per turn instead of a bar
                        done = int(progress.tasks[0].completed)
                        console.print(f"{done}/{len(records)} {result.id}: {mark}")

                report = await replay(
                    records,
                    GrpcInference(channel),
                    profile,
                    demo_registry(),
                    lane=lane,
                    caps=Caps(
                        turn_budget_s=settings.turn_budget_s,
                        task_budget_s=settings.turn_budget_s * 10,
                    ),
                    on_turn=on_turn,
                )
    finally:
        if server is not None:
            await server.stop(grace=2)
    out = report.to_dict()
    out["traces"] = str(traces)
    _export(report, settings, console)
    return out


def _export(report: Any, settings: Any, console: Console) -> None:
    from services.orchestrator.replay.export import push, report_registry, write_textfile

    if settings.textfile_path is None and not settings.pushgateway_url:
        return
    registry = report_registry(report, settings.gold_set)
    if settings.textfile_path is not None:
        write_textfile(settings.textfile_path, registry)
        console.print(f"F1 written to {settings.textfile_path}")
    if settings.pushgateway_url:
        push(settings.pushgateway_url, registry)
        console.print(f"F1 pushed to {settings.pushgateway_url}")


def register(app: typer.Typer) -> None:
    """Adds ``replay`` to the ``agentmesh`` CLI."""

    @app.command()
    def replay(
        traces: Path = typer.Option(..., exists=True, help="Turn records (JSON lines)."),
        lane: str = typer.Option("", help="The candidate lane (default: automatic lanes)."),
        inference: str | None = typer.Option(
            None, help="The inference service's address (default: replay.inference_target)."
        ),
        embedded: bool = typer.Option(
            False, help="Start the embedded inference service in this process."
        ),
        config: Path | None = typer.Option(
            None, help=f"YAML config (profile, replay settings). Default: {EMBEDDED_CONFIG}."
        ),
        report: Path = typer.Option(Path("replay-report.json"), help="The JSON report."),
        textfile: Path | None = typer.Option(
            None, help="Textfile-collector file for the F1 (overrides replay.textfile_path)."
        ),
        pushgateway: str | None = typer.Option(
            None, help="Pushgateway URL for the F1 (overrides replay.pushgateway_url)."
        ),
        limit: int = typer.Option(0, help="Replay only the first N turns."),
        min_f1: float | None = typer.Option(None, help="Exit 1 when the F1 is below this."),
    ) -> None:
        """Re-run recorded turns on a lane with their tool results fed back; score them."""
        console = Console(stderr=True)
        if config is None and EMBEDDED_CONFIG.exists():
            config = EMBEDDED_CONFIG
        overrides: dict[str, Any] = {}
        if textfile is not None:
            overrides["textfile_path"] = textfile
        if pushgateway is not None:
            overrides["pushgateway_url"] = pushgateway
        out = asyncio.run(
            _run(traces, lane, inference, embedded, config, limit, console, overrides)
        )
        report.write_text(json.dumps(out, indent=2) + "\n")
        Console().print(_scores_table(out))
        console.print(f"report: {report}")
        if min_f1 is not None and out["f1"] < min_f1:
            console.print(f"[red]F1 {out['f1']:.3f} is below {min_f1:.2f}[/]")
            raise typer.Exit(1)
