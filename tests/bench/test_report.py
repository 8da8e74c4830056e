"""The benchmark report from synthetic section figures: Markdown, JSON and PNGs are written,
every section and target is there, NaN never reaches the JSON. Nothing is timed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.assemble import assemble, span_floor
from bench.report import markdown_table, write_report


def _turn(wall: float, ok: bool = True, error: str = "") -> dict[str, Any]:
    return {
        "ok": ok,
        "error": error,
        "wall": wall,
        "first_delta": wall / 2,
        "stages": {
            "plan": 2.0,
            "tool_emit": 1.0,
            "tool_wall": 0.1,
            "observe": 0.0,
            "compose": 3.0,
            "queue_prefill": 0.5,
            "network": 0.004,
            "total": wall - 0.002,
        },
        "outcome": "COMPLETED",
        "tool_calls": 3,
        "completion_tokens": 120,
        "llm_stages": 3,
        "spans": [
            {
                "stage": "plan",
                "prompt": 1200,
                "cached": 1000,
                "completion": 40,
                "generations": 1,
                "ttft": 0.4,
                "wall": 2.0,
            },
            {
                "stage": "tool_emit",
                "prompt": 3000,
                "cached": 2900,
                "completion": 60,
                "generations": 3,
                "ttft": 0.3,
                "wall": 1.0,
            },
            {
                "stage": "compose",
                "prompt": 1500,
                "cached": 1200,
                "completion": 20,
                "generations": 1,
                "ttft": 0.5,
                "wall": 3.0,
            },
        ],
    }


def synthetic() -> dict[str, dict[str, Any]]:
    offline = {
        "dtype": "bfloat16",
        "prefill_tps": 400.0,
        "decode_single_tps": 40.0,
        "decode_batched_tps": 200.0,
        "tps": {"1": 38.0, "4": 120.0, "16": 300.0},
        "size": "quick",
    }
    side = {
        "tps": {"1": 30.0, "4": 100.0, "16": 250.0},
        "ttft": {"1": [0.1, 0.2, 0.3], "4": [0.2, 0.3], "16": [0.5, float("nan")]},
        "tools1": [1.0, 1.1],
        "tools3": [1.4, 1.5],
        "tools_ok": "8/8",
        "prefix_cold": [1.0],
        "prefix_warm": [0.2],
    }
    serve = {"ours": side, "vllm": {**side, "prefix_cold": [], "prefix_warm": []}, "size": "quick"}
    turns = {
        "reference": [_turn(7.0), _turn(8.0), _turn(0.0, ok=False, error="UNAVAILABLE: x")],
        "capacity": [
            {
                "sessions": 10,
                "wall": 20.0,
                "turns": [_turn(9.0)] * 9
                + [_turn(0.0, ok=False, error="RESOURCE_EXHAUSTED: lane full")],
            },
        ],
        "size": "quick",
    }
    return {"offline": offline, "serve": serve, "turns": turns, "extra": {"error": "exited 1"}}


def test_report_writes_markdown_json_and_plots(tmp_path: Path) -> None:
    sections = assemble(synthetic())
    assert set(sections) == {
        "serve",
        "prefix",
        "turn_floor",
        "overhead",
        "capacity",
        "budget",
        "extra_error",
    }
    written = write_report(sections, tmp_path, {"machine": "test"})
    names = sorted(p.name for p in written)
    assert names == sorted(
        [
            "report.md",
            "report.json",
            "serve_tokens_per_s.png",
            "serve_ttft_p50.png",
            "turn_vs_floor.png",
            "capacity.png",
        ]
    )
    for path in written:
        assert path.stat().st_size > 0
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    for title in (
        "## Targets",
        "vllm serve",
        "A whole turn vs its floor",
        "Mesh overhead",
        "Capacity",
        "rtx4090",
        "sequential LLM stages",
        "section failed",
    ):
        assert title in md
    assert "![capacity](capacity.png)" not in md  # plots are linked by their titles
    assert "(capacity.png)" in md
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=_no_nan)
    assert report["meta"] == {"machine": "test"}
    targets = [t["name"] for s in report["sections"].values() for t in s.get("targets", [])]
    assert "tokens/s ours / offline @ c=16" in targets
    assert "added ms p50 @ 10 sessions" in targets
    assert "warm / cold plan-prefix TTFT" in targets


def _no_nan(value: str) -> float:
    raise AssertionError(f"{value} in report.json")


def test_capacity_marks_resource_exhausted_and_turn_floor_sums_stages() -> None:
    sections = assemble(synthetic())
    capacity = sections["capacity"]["tables"][0]["rows"]
    assert [row[0] for row in capacity] == [1, 10]
    assert capacity[1][1:3] == [9, 1]
    assert sections["capacity"]["plots"][0]["vlines"] == [{"x": 10, "label": "RESOURCE_EXHAUSTED"}]
    floor_rows = sections["turn_floor"]["tables"][0]["rows"]
    assert [row[0] for row in floor_rows] == ["plan", "tool_emit", "compose", "turn"]
    plan = floor_rows[0]
    assert plan[4] == 200  # uncached: 1200 - 1000
    assert plan[6] == 200 / 400.0 + 40 / 40.0
    # Three parallel generations decode at the offline rate of the next level up (c=4).
    span = {"prompt": 3000, "cached": 2900, "completion": 60, "generations": 3}
    assert span_floor(span, synthetic()["offline"]) == 100 / 400.0 + 60 / 120.0


def test_markdown_table_formats_missing_values() -> None:
    table = markdown_table(["a", "b"], [[float("nan"), None], [1234.5, 0.1234]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| - | - |", "| 1234 | 0.123 |"]


def test_a_failed_floor_section_still_reports_the_rest(tmp_path: Path) -> None:
    data = synthetic()
    data["offline"] = {"error": "exited 1 after 3s"}
    sections = assemble(data)
    assert "serve" not in sections and "turn_floor" not in sections
    assert {"overhead", "capacity", "budget", "offline_error"} <= set(sections)
    write_report(sections, tmp_path)
    assert "exited 1 after 3s" in (tmp_path / "report.md").read_text()
