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
    overhead = {
        "turns": [
            _overhead_turn("mesh", 1, 7.0),
            _overhead_turn("inprocess", 1, 6.9),
            *[_overhead_turn("mesh", 10, 9.0 + i / 10) for i in range(10)],
            *[_overhead_turn("inprocess", 10, 8.95 + i / 10) for i in range(9)],
            {**_overhead_turn("inprocess", 10, 0.0), "ok": False, "error": "UNAVAILABLE: x"},
        ],
        "blocks": [
            {"config": "mesh", "sessions": 1, "block": 0, "wall": 7.0, "refusals": 0.0},
            {"config": "inprocess", "sessions": 1, "block": 0, "wall": 6.9, "refusals": 0.0},
            {"config": "mesh", "sessions": 10, "block": 0, "wall": 12.0, "refusals": 2.0},
            {"config": "inprocess", "sessions": 10, "block": 0, "wall": 12.0, "refusals": 1.0},
        ],
        "startup_s": {"mesh": 60.0, "inprocess": 50.0},
        "size": "quick",
    }
    return {
        "offline": offline,
        "serve": serve,
        "turns": turns,
        "overhead": overhead,
        "extra": {"error": "exited 1"},
    }


def _overhead_turn(config: str, sessions: int, wall: float) -> dict[str, Any]:
    """A turn of the overhead section: its LLM stages (plan 2 + emit 1 + compose 3 s, 4 ms of
    it network) are the same on both configurations, so wall - 5.996 s is outside the core."""
    return {**_turn(wall), "config": config, "sessions": sessions, "block": 0, "tool_self": 0.08}


def test_report_writes_markdown_json_and_plots(tmp_path: Path) -> None:
    sections = assemble(synthetic())
    assert set(sections) == {
        "serve",
        "prefix",
        "turn_floor",
        "overhead_breakdown",
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
        "Mesh overhead: three processes vs one process",
        "Mesh gaps per turn from the latency breakdown",
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
    assert {"overhead", "overhead_breakdown", "capacity", "budget", "offline_error"} <= set(
        sections
    )
    write_report(sections, tmp_path)
    assert "exited 1 after 3s" in (tmp_path / "report.md").read_text()


def test_overhead_is_mesh_minus_one_process_outside_the_inference_core() -> None:
    sec = assemble(synthetic())["overhead"]
    per_config, parts, added = (t["rows"] for t in sec["tables"])
    assert [(r[0], r[1], r[2], r[3]) for r in per_config] == [
        (1, "mesh (3 processes)", 1, 0),
        (1, "one process", 1, 0),
        (10, "mesh (3 processes)", 10, 0),
        (10, "one process", 9, 1),
    ]
    assert [r[10] for r in per_config] == [0.0, 0.0, 2.0, 1.0]  # full-lane refusals
    core = 2.0 + 1.0 + 3.0 - 0.004
    assert per_config[0][6] == core
    assert per_config[0][7] == (7.0 - core) * 1000
    # Outside 1004 ms: edge 2, network 4, tool wall 100 (80 of it the tool service's), rest.
    assert [round(x, 6) for x in parts[0][2:]] == [2.0, 4.0, 100.0, 80.0, 898.0]
    at1, at10 = added
    assert at1[0] == 1 and round(at1[3], 6) == 100.0  # 7.0 s vs 6.9 s, same core time
    # Nearest rank: p50 mesh 9.4 s vs one process 9.35 s; p95 9.9 s vs 9.75 s.
    assert round(at10[3], 6) == 50.0 and round(at10[4], 6) == 150.0
    assert round(at10[1], 6) == 50.0  # the walls differ by as much (same core time)
    targets = {t["name"]: t for t in sec["targets"]}
    assert targets["added ms p50 @ 10 sessions"]["met"] is False
    assert targets["added ms p95 @ 10 sessions"]["target"] == "<= 20"
