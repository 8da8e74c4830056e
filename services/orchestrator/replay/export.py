"""The replay's scores where the alert reads them: a node-exporter textfile-collector file
(written atomically) or a Prometheus Pushgateway."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
from prometheus_client.exposition import generate_latest

from services.orchestrator.replay.runner import ReplayReport

JOB = "agentmesh_replay"


def report_registry(report: ReplayReport, gold_set: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    labels = ["lane", "gold_set"]
    lane = report.lane or "auto"
    row = report.to_dict()
    scores = report.score
    gauges = {
        "agentmesh_replay_tool_selection_f1": ("Tool-selection F1 by name.", scores.name.f1),
        "agentmesh_replay_tool_selection_precision": (
            "Tool-selection precision by name.",
            scores.name.precision,
        ),
        "agentmesh_replay_tool_selection_recall": (
            "Tool-selection recall by name.",
            scores.name.recall,
        ),
        "agentmesh_replay_tool_arguments_f1": (
            "Tool-call F1 by name and arguments.",
            scores.arguments.f1,
        ),
        "agentmesh_replay_abstention_accuracy": (
            "Share of no-tool turns where no tool was called.",
            scores.abstention,
        ),
        "agentmesh_replay_parse_failure_rate": (
            "Share of emitted tool calls that did not parse.",
            float(row["parse_failure_rate"]),
        ),
        "agentmesh_replay_turns": ("Turns replayed.", float(len(report.turns))),
        "agentmesh_replay_latency_p95_seconds": (
            "p95 turn latency in the replay.",
            float(row["latency_s"]["p95"]),
        ),
    }
    for name, (doc, value) in gauges.items():
        Gauge(name, doc, labels, registry=registry).labels(lane, gold_set).set(value)
    Gauge(
        "agentmesh_replay_last_run_timestamp_seconds",
        "When the replay last finished (Unix time).",
        labels,
        registry=registry,
    ).labels(lane, gold_set).set_to_current_time()
    return registry


def write_textfile(path: Path, registry: CollectorRegistry) -> None:
    """Atomically (the collector never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(generate_latest(registry))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def push(url: str, registry: CollectorRegistry, job: str = JOB) -> None:
    push_to_gateway(url, job=job, registry=registry)
