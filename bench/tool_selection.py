"""Tool selection on the labelled customer-success turns (tests/data/tool_selection_turns.jsonl):
the plan stage of the embedded workhorse, scored as the plan chose ("plan") and with the
reference reads as its default ("default_reads"). Prints precision, recall and F1 by tool
name (micro-averaged over the turns that need tools; services/orchestrator/replay/scoring.py)
and abstention accuracy (turns that need none, scored apart) for both; the better one is the
embedded default (config/embedded.yaml).

    python -m bench.tool_selection [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from services.orchestrator.replay.scoring import Score

REPO = Path(__file__).resolve().parents[1]
TURNS = REPO / "tests" / "data" / "tool_selection_turns.jsonl"
MODES = ("plan", "default_reads")


def load_turns(path: Path = TURNS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def main(limit: int) -> None:
    import grpc

    from services.inference.config import InferenceSettings
    from services.inference.service import InferenceService
    from services.orchestrator.clients import GrpcInference
    from services.orchestrator.downstream import tool_from_proto
    from services.orchestrator.loop.policy import AgentProfile, Caps
    from services.orchestrator.loop.runner import TurnInput, TurnRunner
    from services.tools.registry import default_registry
    from services.tools.service import spec_to_pb
    from shared.config import load_settings, read_config_section
    from shared.server import GrpcServer

    settings = load_settings(
        InferenceSettings,
        "inference",
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        preset="embedded",
        model_cache_dir=REPO / "var" / "models",
        cpu_kvcache_gib=2,
    )
    server = GrpcServer(InferenceService(settings), settings)
    await server.start()
    await server.wait_until_serving(900)
    profile_cfg = read_config_section(REPO / "config" / "embedded.yaml", "orchestrator")["profile"]
    registry = tuple(tool_from_proto(t) for t in spec_to_pb(default_registry()))
    scores = {mode: Score() for mode in MODES}
    rows = []
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            runner = TurnRunner(GrpcInference(channel), _NoTools(), AgentProfile(**profile_cfg))
            for turn in load_turns()[: limit or None]:
                inp = TurnInput(
                    session_id="bench",
                    turn_index=1,
                    history=(),
                    user_message=turn["message"],
                    registry=registry,
                    caps=Caps(turn_budget_s=300, task_budget_s=3000),
                    customer_id=turn["customer_id"],
                )
                planned, _ = await runner.select_tools(inp)
                chosen = {
                    "plan": planned,
                    "default_reads": runner.apply_selection(inp, planned, "default_reads"),
                }
                for mode in MODES:
                    scores[mode].add_names(turn["tools"], chosen[mode])
                rows.append({"id": turn["id"], "expected": turn["tools"], **chosen})
                print(f"{turn['id']:<20} want {turn['tools']} plan {planned}", flush=True)
    finally:
        await server.stop(grace=2)
    report = {
        mode: scores[mode].row()["by_name"]
        | {"abstention_accuracy": scores[mode].row()["abstention_accuracy"]}
        for mode in MODES
    }
    print(json.dumps(report, indent=2))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tool_selection.json").write_text(
        json.dumps({"scores": report, "turns": rows}, indent=2)
    )


class _NoTools:
    async def list_tools(self, *, timeout_s: float) -> list[Any]:
        return []

    async def execute(self, invocations: Any, *, principal: Any, timeout_s: float) -> list[Any]:
        return []


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=0)
    asyncio.run(main(parser.parse_args().limit))
