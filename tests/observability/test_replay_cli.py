"""`agentmesh replay` end to end, as a process, against a scripted inference service over
gRPC: the JSON report, the scores table, the textfile-collector file, the --min-f1 gate."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.orchestrator.replay.records import read_records, write_records
from tests.orchestrator.grpc_fakes import start_fake_inference

REPO = Path(__file__).resolve().parents[2]
GOLD = REPO / "tests" / "data" / "gold_turns.jsonl"


async def _replay(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "replay",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_replay_command_reports_and_exports_the_f1(tmp_path: Path) -> None:
    server, model = await start_fake_inference()
    model.plan_tools = ["billing_lookup"]  # "the model" plans billing_lookup every time
    records = {r.id: r for r in read_records(GOLD)}
    chosen = [records["failed-payment-c2"], records["kb-password"], records["none-hello"]]
    traces = tmp_path / "turns.jsonl"
    write_records(traces, chosen)
    report = tmp_path / "report.json"
    prom = tmp_path / "agentmesh_replay.prom"
    try:
        common = [
            f"--traces={traces}",
            "--lane=workhorse",
            f"--inference={server.address}",
            f"--report={report}",
            f"--textfile={prom}",
        ]
        code, out = await _replay(*common)
        assert code == 0, out
        data = json.loads(report.read_text())
        # The embedded profile (config/embedded.yaml) runs the reference reads (crm_lookup,
        # kb_search, billing_lookup) whenever the plan chooses anything. failed-payment:
        # billing_lookup expected (tp 1, fp 2); kb-password: kb_search expected (tp 1, fp 2);
        # none-hello: a wrong abstention, outside the F1. P = 2/6, R = 1, F1 = 0.5.
        by_name = data["scores"]["by_name"]
        assert (by_name["tp"], by_name["fp"], by_name["fn"]) == (2, 4, 0)
        assert data["f1"] == 0.5
        assert data["scores"]["abstention_accuracy"] == 0.0
        assert data["turns"] == 3 and data["errors"] == 0
        assert "by name + arguments" in out and "3/3" in out
        families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
        (f1,) = families["agentmesh_replay_tool_selection_f1"].samples
        assert f1.value == 0.5 and f1.labels["lane"] == "workhorse"
        code, out = await _replay(*common, "--min-f1=0.92")
        assert code == 1, out
    finally:
        await server.stop(grace=1)
