"""Raw section figures (bench/sections.py) -> report sections (bench/report.py).

Pure functions of the JSON the sections wrote: the fast test feeds them synthetic figures.
Ratios are written so that the targets of issue 10 read directly (report only, never tests).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bench.assemble_overhead import breakdown_overhead_section, overhead_section
from bench.figures import NAN, div, new_section, pct, target
from bench.turn_latency import LABELS, SEED_GPU

# The seed's RTX 4090 workhorse: Qwen2.5-14B-AWQ decoding at 135 tokens/s per stream.
SEED_DECODE_TPS = 135.0
# Not in the seed: a 14B AWQ prefill rate on a 4090 assumed for the projection (uncached
# tokens only; the seed books 0.10 s of queue + prefill with the prefix cached).
ASSUMED_GPU_PREFILL_TPS = 5000.0
STAGE_ORDER = ("plan", "tool_emit", "observe", "compose")


# ---- inference service vs vllm serve vs offline ----------------------------------------------


def serve_section(offline: Mapping[str, Any], serve: Mapping[str, Any]) -> dict[str, Any]:
    sec = new_section(
        "Inference service vs vllm serve vs the offline engine", serve.get("size", "")
    )
    ours, vllm = serve.get("ours", {}), serve.get("vllm", {})
    levels = sorted(
        {int(k) for k in ours.get("tps", {})} | {int(k) for k in offline.get("tps", {})}
    )
    rows = []
    for c in levels:
        k = str(c)
        o, v, f = ours.get("tps", {}).get(k), vllm.get("tps", {}).get(k), offline["tps"].get(k)
        ot, vt = ours.get("ttft", {}).get(k, []), vllm.get("ttft", {}).get(k, [])
        rows.append(
            [
                c,
                f,
                o,
                v,
                div(o, f),
                div(v, f),
                pct(ot, 0.5),
                pct(vt, 0.5),
                pct(ot, 0.95),
                pct(vt, 0.95),
                div(pct(ot, 0.5), pct(vt, 0.5)),
            ]
        )
        sec["targets"].append(
            target(f"tokens/s ours / offline @ c={c}", div(o, f), ">= 0.9", div(o, f) >= 0.9)
        )
        r = div(pct(ot, 0.5), pct(vt, 0.5))
        sec["targets"].append(target(f"TTFT p50 ours / vllm serve @ c={c}", r, "<= 1.0", r <= 1.0))
    sec["tables"].append(
        {
            "title": "output tokens/s and time to first token (s)",
            "columns": [
                "concurrency",
                "offline tok/s",
                "ours tok/s",
                "vllm serve tok/s",
                "ours / offline",
                "vllm / offline",
                "TTFT p50 ours",
                "TTFT p50 vllm",
                "TTFT p95 ours",
                "TTFT p95 vllm",
                "TTFT p50 ours / vllm",
            ],
            "rows": rows,
        }
    )
    sec["tables"].append(
        {
            "title": "the offline engine (the floor)",
            "columns": ["dtype", "prefill tok/s", "decode tok/s (1 stream)", "decode tok/s (16)"],
            "rows": [
                [
                    offline.get("dtype"),
                    offline.get("prefill_tps"),
                    offline.get("decode_single_tps"),
                    offline.get("decode_batched_tps"),
                ]
            ],
        }
    )
    sec["plots"].append(
        {
            "name": "serve_tokens_per_s",
            "title": "output tokens/s vs concurrency",
            "kind": "line",
            "x": levels,
            "series": {
                "offline engine": [offline["tps"].get(str(c)) for c in levels],
                "agentmesh": [ours.get("tps", {}).get(str(c)) for c in levels],
                "vllm serve": [vllm.get("tps", {}).get(str(c)) for c in levels],
            },
            "xlabel": "concurrent requests",
            "ylabel": "tokens/s",
        }
    )
    sec["plots"].append(
        {
            "name": "serve_ttft_p50",
            "title": "time to first token p50",
            "kind": "bar",
            "x": levels,
            "series": {"agentmesh": [r[6] for r in rows], "vllm serve": [r[7] for r in rows]},
            "xlabel": "concurrent requests",
            "ylabel": "seconds",
        }
    )
    sec["notes"].append(
        "Each level runs in waves (a wave = `concurrency` requests); the offline engine gets the "
        "same prompts, one `LLM.generate` per wave. Our service (bench/serve_child.py: the "
        "production bootstrap), vllm serve and the offline engine each run in their own process, "
        "one at a time; the streaming client is the section's process."
    )
    return sec


def prefix_section(serve: Mapping[str, Any]) -> dict[str, Any]:
    sec = new_section("Prefix cache and parallel emission", serve.get("size", ""))
    ours, vllm = serve.get("ours", {}), serve.get("vllm", {})
    cold, warm = pct(ours.get("prefix_cold", []), 0.5), pct(ours.get("prefix_warm", []), 0.5)
    o1, o3 = pct(ours.get("tools1", []), 0.5), pct(ours.get("tools3", []), 0.5)
    v1, v3 = pct(vllm.get("tools1", []), 0.5), pct(vllm.get("tools3", []), 0.5)
    sec["tables"].append(
        {
            "title": "plan-sized prefix: TTFT p50 (s), ours",
            "columns": ["cold (new prefix)", "warm (same prefix)", "warm / cold"],
            "rows": [[cold, warm, div(warm, cold)]],
        }
    )
    sec["tables"].append(
        {
            "title": "tool stage, median seconds (ours: CallTools parallel; vllm: concurrent "
            "named tool_choice requests)",
            "columns": ["server", "1 call", "3 calls", "3 / 1", "schema-valid calls"],
            "rows": [
                ["agentmesh", o1, o3, div(o3, o1), ours.get("tools_ok", "")],
                ["vllm serve", v1, v3, div(v3, v1), vllm.get("tools_ok", "")],
            ],
        }
    )
    sec["targets"].append(
        target("warm / cold plan-prefix TTFT", div(warm, cold), "<= 0.25", div(warm, cold) <= 0.25)
    )
    sec["targets"].append(
        target("3 parallel emissions / 1", div(o3, o1), "<= 1.5", div(o3, o1) <= 1.5)
    )
    return sec


# ---- turns -------------------------------------------------------------------------------


def span_floor(span: Mapping[str, Any], offline: Mapping[str, Any]) -> float:
    """The engine's own time for one stage generation: uncached prompt tokens at the offline
    prefill rate + completion tokens at the offline decode rate (batched when parallel)."""
    uncached = max(0, span["prompt"] - span["cached"])
    gens = max(1, int(span.get("generations", 1)))
    if gens == 1:
        rate = offline.get("decode_single_tps", NAN)
    else:
        tps = {int(k): v for k, v in offline.get("tps", {}).items()}
        above = [c for c in sorted(tps) if c >= gens]
        rate = tps[above[0]] if above else offline.get("decode_batched_tps", NAN)
    return div(uncached, offline.get("prefill_tps")) + div(span["completion"], rate)


def _stages(spans: Sequence[Mapping[str, Any]]) -> list[str]:
    seen = list(dict.fromkeys(s["stage"] for s in spans))
    return sorted(seen, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else 99, s))


def turn_section(turns: Mapping[str, Any], offline: Mapping[str, Any]) -> dict[str, Any]:
    sec = new_section("A whole turn vs its floor", turns.get("size", ""))
    ref = [t for t in turns.get("reference", []) if t["ok"]]
    spans = [s for t in ref for s in t["spans"] or []]
    n = max(1, len(ref))
    rows = []
    for stage in _stages(spans):
        group = [s for s in spans if s["stage"] == stage]
        prompt = sum(s["prompt"] for s in group) / n
        cached = sum(s["cached"] for s in group) / n
        completion = sum(s["completion"] for s in group) / n
        floor = sum(span_floor(s, offline) for s in group) / n
        measured = sum(s["wall"] for s in group) / n
        rows.append(
            [
                stage,
                len(group) / n,
                prompt,
                cached,
                prompt - cached,
                completion,
                floor,
                measured,
                div(measured, floor),
            ]
        )
    floors = [sum(span_floor(s, offline) for s in t["spans"] or []) for t in ref]
    walls = [t["wall"] for t in ref]
    total_uncached = sum(r[4] for r in rows)
    rows.append(
        [
            "turn",
            sum(r[1] for r in rows),
            sum(r[2] for r in rows),
            sum(r[3] for r in rows),
            total_uncached,
            sum(r[5] for r in rows),
            pct(floors, 0.5),
            pct(walls, 0.5),
            div(pct(walls, 0.5), pct(floors, 0.5)),
        ]
    )
    sec["tables"].append(
        {
            "title": f"per stage, mean per turn over {len(ref)} reference turns (floor and "
            "measured in seconds; the turn row: p50 of client wall and of its floor)",
            "columns": [
                "stage",
                "generations",
                "prompt tok",
                "cached tok",
                "uncached tok",
                "completion tok",
                "floor s",
                "measured s",
                "measured / floor",
            ],
            "rows": rows,
        }
    )
    ratio = div(pct(walls, 0.5), pct(floors, 0.5))
    sec["targets"].append(
        target("reference turn p50 (s)", pct(walls, 0.5), "<= 25", pct(walls, 0.5) <= 25)
    )
    sec["targets"].append(target("turn / its floor (p50)", ratio, "<= 1.3", ratio <= 1.3))
    sec["plots"].append(
        {
            "name": "turn_vs_floor",
            "title": "per stage: measured vs floor (s, mean per turn)",
            "kind": "bar",
            "x": [r[0] for r in rows[:-1]],
            "series": {"floor": [r[6] for r in rows[:-1]], "measured": [r[7] for r in rows[:-1]]},
            "xlabel": "stage",
            "ylabel": "seconds",
        }
    )
    sec["notes"].append(
        "floor = uncached prompt tokens / offline prefill tok/s + completion tokens / offline "
        "decode tok/s (parallel emissions: the offline batched rate), from this run's offline "
        "section; token counts from the turn's `chat` spans (usage as the engine reported it)."
    )
    return sec


def capacity_section(turns: Mapping[str, Any]) -> dict[str, Any]:
    sec = new_section("Capacity: concurrent sessions", turns.get("size", ""))
    ref = [t for t in turns.get("reference", []) if t["ok"]]
    rows = [
        [
            1,
            len(ref),
            0,
            pct([t["wall"] for t in ref], 0.95),
            div(len(ref), sum(t["wall"] for t in ref)),
        ]
    ]
    for level in turns.get("capacity", []):
        ok = [t for t in level["turns"] if t["ok"]]
        rejected = sum("RESOURCE_EXHAUSTED" in (t.get("error") or "") for t in level["turns"])
        rows.append(
            [
                level["sessions"],
                len(ok),
                rejected,
                pct([t["wall"] for t in ok], 0.95),
                div(len(ok), level["wall"]),
            ]
        )
    sec["tables"].append(
        {
            "title": "one turn per session, all at once (sessions 1: the reference turns, one "
            "at a time)",
            "columns": ["sessions", "turns ok", "RESOURCE_EXHAUSTED", "p95 turn s", "turns/s"],
            "rows": rows,
        }
    )
    first_reject = next((r[0] for r in rows if r[2]), None)
    plot: dict[str, Any] = {
        "name": "capacity",
        "title": "p95 turn time and turns/s vs concurrent sessions",
        "kind": "line",
        "x": [r[0] for r in rows],
        "series": {"p95 turn s": [r[3] for r in rows], "turns/s x100": [r[4] * 100 for r in rows]},
        "xlabel": "concurrent sessions",
        "ylabel": "seconds / turns per 100 s",
    }
    if first_reject is not None:
        plot["vlines"] = [{"x": first_reject, "label": "RESOURCE_EXHAUSTED"}]
        sec["notes"].append(
            f"admission first answered RESOURCE_EXHAUSTED at {first_reject} sessions"
        )
    else:
        sec["notes"].append(
            "no turn ended in RESOURCE_EXHAUSTED at these levels (the orchestrator retries a full "
            "lane on its hint: see the network column of the latency-breakdown gaps table)"
        )
    sec["plots"].append(plot)
    return sec


def budget_section(turns: Mapping[str, Any]) -> dict[str, Any]:
    sec = new_section(
        "Per-turn budget: the seed's, measured, projected to rtx4090", turns.get("size", "")
    )
    ref = [t for t in turns.get("reference", []) if t["ok"]]
    n = max(1, len(ref))
    spans = [s for t in ref for s in t["spans"] or []]

    def projected(stage: str) -> float:
        group = [s for s in spans if s["stage"] == stage]
        if not group:
            return NAN
        total = 0.0
        for s in group:
            gens = max(1, int(s.get("generations", 1)))
            total += (s["prompt"] - s["cached"]) / ASSUMED_GPU_PREFILL_TPS
            total += s["completion"] / gens / SEED_DECODE_TPS
        return total / n

    rows = []
    keys = ("plan", "tool_emit", "tool_wall", "observe", "compose", "queue_prefill", "network")
    projected_total = 0.0
    for key in (*keys, "total", "wall"):
        measured = pct(
            [t["wall"] if key == "wall" else t["stages"].get(key, NAN) for t in ref], 0.5
        )
        if key in STAGE_ORDER:
            proj = projected(key)
        elif key in ("tool_wall", "network"):
            proj = measured  # not the model's time: as measured here
        elif key == "total":
            proj = projected_total
        else:
            proj = NAN
        if key in (*STAGE_ORDER, "tool_wall", "network") and not math.isnan(proj):
            projected_total += proj
        rows.append([LABELS[key], SEED_GPU[key], measured, proj])
    llm = [t.get("llm_stages", 0) for t in ref]
    sec["tables"].append(
        {
            "title": "seconds per turn (measured: p50 here, SmolLM2-135M on this CPU; projected: "
            "this run's token counts at the seed's 135 tok/s decode and an assumed "
            f"{ASSUMED_GPU_PREFILL_TPS:.0f} tok/s uncached prefill)",
            "columns": ["stage", "seed GPU ref", "measured p50", "projected rtx4090"],
            "rows": rows,
        }
    )
    sec["tables"].append(
        {
            "title": "sequential LLM stages per turn",
            "columns": ["p50", "max", "turns"],
            "rows": [[pct([float(x) for x in llm], 0.5), max(llm) if llm else NAN, len(llm)]],
        }
    )
    return sec


def assemble(data: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Report sections from whichever raw sections are present (a failed one is noted)."""
    out: dict[str, dict[str, Any]] = {}
    offline = data.get("offline") or {}
    if "tps" not in offline:  # the floor section failed: nothing to compare with
        offline = {}
    if "serve" in data and offline:
        out["serve"] = serve_section(offline, data["serve"])
        out["prefix"] = prefix_section(data["serve"])
    if "turns" in data:
        turns = data["turns"]
        if offline:
            out["turn_floor"] = turn_section(turns, offline)
        out["overhead_breakdown"] = breakdown_overhead_section(turns)
        out["capacity"] = capacity_section(turns)
        out["budget"] = budget_section(turns)
    if "overhead" in data and data["overhead"].get("turns"):
        out["overhead"] = overhead_section(data["overhead"])
    for name, raw in data.items():
        if raw.get("error"):
            out[f"{name}_error"] = {"title": f"section {name}", "error": raw["error"]}
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else NAN
