"""The measuring half of ``make bench``: each section runs in its own process and writes raw
figures as JSON (bench/assemble.py turns them into tables, plots and targets).

    python -m bench.sections offline|serve|turns|overhead --out FILE [--quick]

- ``offline``: the engine alone (``vllm.LLM``, the workhorse lane's engine arguments with
  the dtype chosen for this machine): prefill tokens/s on uncached prompts, single-stream
  decode tokens/s, and output tokens/s at each concurrency level on the serve prompts (the
  floor the servers are compared with).
- ``serve``: our inference service vs ``vllm serve`` (bench/inference_vs_vllm_serve.py),
  each level run in >= 3 waves; plus plan-sized prefix TTFT cold vs warm and CallTools 3
  calls vs 1 on ours.
- ``turns``: the embedded mesh (bench/turn_latency.py's mesh, parallel emission only) with
  an in-memory span exporter: per turn the client wall, the latency breakdown, per-stage
  prompt / cached / completion tokens (the ``chat`` spans), LLM stages; then turns at
  concurrent sessions (capacity, RESOURCE_EXHAUSTED counted).
- ``overhead``: the mesh with every service in its own process vs the whole agent in one
  process (bench/mesh_overhead.py), both up at once, the same scripted turns alternating
  between them at 1 and N concurrent sessions: per turn the client wall and the latency
  breakdown (what of it the inference core spent itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]

# Sizes: (full, quick). Quick is the minimum that still exercises every code path.
SIZES: dict[str, tuple[Any, Any]] = {
    "levels": ([1, 4, 16], [1, 4]),
    "waves": (3, 1),
    "max_tokens": (32, 8),
    "calltools_reps": (3, 1),
    "prefix_reps": (3, 1),
    "offline_prefill_prompts": (8, 2),
    "decode_tokens": (64, 16),
    "turn_sessions": (2, 1),
    "turn_turns": (2, 1),
    "capacity_levels": ([4, 10, 32], [2]),
    # overhead: concurrent sessions; turns of the one session at level 1 (the five-turn
    # task); turns per session and blocks per configuration at the levels above 1.
    "overhead_levels": ([1, 10], [1, 2]),
    "overhead_turns": (5, 1),
    "overhead_turns_at_level": (1, 1),
    "overhead_blocks": (1, 1),
}


def size(args: argparse.Namespace, key: str) -> Any:
    full, quick = SIZES[key]
    return quick if args.quick else full


def resolved_engine_args(
    engine_args: dict[str, Any], model_path: str, settings: Any, device: str = "cpu"
) -> dict[str, Any]:
    """The lane's engine arguments configured for the machine as the service's engine does
    (dtype and, on CPU, kv_cache_memory_bytes), with its OpenMP binding in the environment."""
    from services.inference.config import apply_cpu_threads
    from services.inference.engine_setup import choose_engine_setup
    from services.inference.kv_cache import read_kv_shape
    from services.inference.machine import machine_facts

    setup = choose_engine_setup(
        engine_args,
        machine_facts(device),
        read_kv_shape(model_path),
        settings.kvcache_gib(),
        settings.cpu_omp_threads_bind,
        "",  # this process is not pinned around the engines it starts
    )
    for line in setup.describe():
        progress(f"engine {line}")
    apply_cpu_threads(setup.cpu_threads)
    return setup.engine_args(engine_args)


@dataclass
class BenchLane:
    """The workhorse lane every section measures, as the service would load it."""

    settings: Any  # InferenceSettings
    lanes: Any  # LanesConfig (workhorse possibly pointed at another model folder)
    model_path: str
    engine_args: dict[str, Any]  # configured for the machine (dtype, KV cache size)
    device: str  # "cpu" | "gpu"


def workhorse(args: argparse.Namespace, **overrides: Any) -> BenchLane:
    """``args.preset`` (default embedded), ``args.device`` (cpu), ``args.model`` (a folder
    replacing the lane's model) and ``args.load_format`` (e.g. dummy) are optional."""
    from services.inference.config import InferenceSettings, apply_engine_environment
    from services.inference.model_prep import resolve_model
    from shared.config import load_settings

    device: Literal["cpu", "gpu"] = "gpu" if getattr(args, "device", None) == "gpu" else "cpu"
    settings = load_settings(
        InferenceSettings,
        "inference",
        preset=getattr(args, "preset", None) or "embedded",
        hosted_lanes=["workhorse"],
        cpu_kvcache_gib=args.kvcache_gib,
        **overrides,
    )
    lanes = settings.load_lanes()
    lane = lanes.lanes["workhorse"]
    if getattr(args, "model", None):
        lane.model = str(args.model)
    if getattr(args, "load_format", None):
        lane.engine_args = {**lane.engine_args, "load_format": args.load_format}
    apply_engine_environment(settings, device)
    model_path = resolve_model(lane.model, settings.models_dir())
    engine_args = resolved_engine_args(
        dict(lane.engine_args), model_path, settings, "cuda" if device == "gpu" else "cpu"
    )
    return BenchLane(settings, lanes, model_path, engine_args, device)


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- offline: the engine alone ------------------------------------------------------------


def offline(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from bench.inference_vs_vllm_serve import PROMPTS, SYSTEM

    bl = workhorse(args)
    lane = bl.lanes.lanes["workhorse"]
    engine_args = bl.engine_args
    t0 = time.monotonic()
    llm = LLM(model=bl.model_path, **engine_args)
    progress(f"offline engine ready in {time.monotonic() - t0:.1f}s ({engine_args['dtype']})")
    template = lane.template_path().read_text()
    tokenizer = llm.get_tokenizer()

    def render(user: str, system: str = SYSTEM) -> str:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        return str(text)

    def gen(prompts: list[str], max_tokens: int, *, ignore_eos: bool = False) -> tuple[float, Any]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        start = time.monotonic()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.monotonic() - start, outs

    gen([render("warm up")], 4)
    # Prefill: long prompts, each with a unique head so nothing comes from the prefix cache.
    filler = " ".join(PROMPTS) * 12
    prefill_tokens = 0
    prefill_wall = 0.0
    for i in range(size(args, "offline_prefill_prompts")):
        wall, outs = gen([render(filler, system=f"[{i}-{time.time_ns()}] {SYSTEM}")], 1)
        prefill_wall += wall
        prefill_tokens += len(outs[0].prompt_token_ids)
    decode_n = size(args, "decode_tokens")
    wall, outs = gen([render("Count to one hundred.")], decode_n, ignore_eos=True)
    decode_single = len(outs[0].outputs[0].token_ids) / wall
    batch = [render(PROMPTS[i % len(PROMPTS)]) for i in range(16)]
    wall, outs = gen(batch, decode_n, ignore_eos=True)
    decode_batched = sum(len(o.outputs[0].token_ids) for o in outs) / wall
    tps: dict[str, float] = {}
    for level in size(args, "levels"):
        tokens = 0
        total = 0.0
        for w in range(size(args, "waves")):
            prompts = [render(PROMPTS[(w * level + i) % len(PROMPTS)]) for i in range(level)]
            wall, outs = gen(prompts, size(args, "max_tokens"))
            total += wall
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        tps[str(level)] = tokens / total
        progress(f"offline c={level}: {tps[str(level)]:.1f} tok/s")
    return {
        "dtype": engine_args["dtype"],
        "prefill_tps": prefill_tokens / prefill_wall,
        "prefill_tokens": prefill_tokens,
        "decode_single_tps": decode_single,
        "decode_batched_tps": decode_batched,
        "tps": tps,
    }


# ---- serve: ours vs vllm serve --------------------------------------------------------------


def serve(args: argparse.Namespace) -> dict[str, Any]:
    from bench import inference_vs_vllm_serve as ivs

    bench_args = argparse.Namespace(
        max_tokens=size(args, "max_tokens"),
        levels=size(args, "levels"),
        min_requests=1,
        waves=size(args, "waves"),
        calltools_reps=size(args, "calltools_reps"),
        prefix_reps=size(args, "prefix_reps"),
        kvcache_gib=args.kvcache_gib,
        preset=args.preset,
        device=args.device,
        model=args.model,
        load_format=args.load_format,
        vllm_log=str(REPO / "var" / "bench-vllm-serve.log"),
    )

    def side(s: ivs.Side) -> dict[str, Any]:
        return {
            "tps": {str(k): v for k, v in s.tps.items()},
            "ttft": {str(k): v for k, v in s.ttft.items()},
            "tools1": s.tools1,
            "tools3": s.tools3,
            "tools_ok": s.tools_ok,
            "prefix_cold": s.prefix_cold,
            "prefix_warm": s.prefix_warm,
        }

    async def both() -> dict[str, Any]:
        out: dict[str, Any] = {}
        progress("serve: our inference service")
        out["ours"] = side(await ivs.bench_ours(bench_args))
        progress("serve: vllm serve")
        out["vllm"] = side(await ivs.bench_vllm(bench_args))
        return out

    return asyncio.run(both())


# ---- turns: the mesh ------------------------------------------------------------------------


def _chat_spans(exporter: Any) -> list[dict[str, Any]]:
    from shared import semconv as sc

    rows = []
    for span in exporter.get_finished_spans():
        attrs = span.attributes or {}
        if attrs.get(sc.GEN_AI_OPERATION_NAME) != sc.OP_CHAT or sc.AM_STAGE not in attrs:
            continue
        rows.append(
            {
                "stage": str(attrs[sc.AM_STAGE]),
                "prompt": int(attrs.get(sc.GEN_AI_USAGE_INPUT_TOKENS, 0)),  # type: ignore[arg-type]
                "cached": int(attrs.get(sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, 0)),  # type: ignore[arg-type]
                "completion": int(attrs.get(sc.GEN_AI_USAGE_OUTPUT_TOKENS, 0)),  # type: ignore[arg-type]
                "generations": int(attrs.get(sc.AM_GENERATIONS, 1)),  # type: ignore[arg-type]
                "ttft": float(attrs.get(sc.AM_SERVER_TTFT, math.nan)),  # type: ignore[arg-type]
                "wall": ((span.end_time or 0) - (span.start_time or 0)) / 1e9,
            }
        )
    return rows


def _turn_row(sample: Any, spans: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {**sample.row(), "spans": spans}


def turns(args: argparse.Namespace) -> dict[str, Any]:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from bench import turn_latency as tl

    exporter = InMemorySpanExporter()
    targs = argparse.Namespace(kvcache_gib=args.kvcache_gib, rounds=1)

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {"reference": [], "capacity": []}
        with tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as folder:
            async with tl.mesh(targs, Path(folder), modes=("parallel",), exporter=exporter) as m:
                progress(f"turns: mesh up in {m.startup_s:.1f}s")
                stub = m.stubs["parallel"]
                customer, text = tl.WARM_UP
                sid = await tl.new_session(stub, customer)
                await tl.run_turn(stub, sid, text, tl.TurnSample("parallel", -1, -1))
                progress("turns: warm-up turn done")
                n_turns = size(args, "turn_turns")
                for s in range(size(args, "turn_sessions")):
                    customer, messages = tl.script(s, n_turns)
                    sid = await tl.new_session(stub, customer)
                    for t, msg in enumerate(messages):
                        exporter.clear()
                        sample = await tl.run_turn(stub, sid, msg, tl.TurnSample("parallel", s, t))
                        out["reference"].append(_turn_row(sample, _chat_spans(exporter)))
                        progress(f"turns: reference {sample.line()}")
                        save(args, out, partial=True)
                for level in size(args, "capacity_levels"):
                    samples, wall = await tl.concurrent_phase(m, level, 1)
                    out["capacity"].append(
                        {
                            "sessions": level,
                            "wall": wall,
                            "turns": [_turn_row(x, None) for x in samples],
                        }
                    )
                    progress(f"turns: {level} sessions at once in {wall:.1f}s")
                    save(args, out, partial=True)
        return out

    return asyncio.run(go())


# ---- overhead: separate processes vs one process --------------------------------------------


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    from bench import mesh_overhead as mo

    plan = mo.Plan(
        levels=size(args, "overhead_levels"),
        turns=size(args, "overhead_turns"),
        turns_at_level=size(args, "overhead_turns_at_level"),
        blocks=size(args, "overhead_blocks"),
        kvcache_gib=args.kvcache_gib,
        preset=args.preset or "embedded",
    )
    return asyncio.run(mo.measure(plan, progress, lambda data: save(args, data, partial=True)))


SECTIONS = {"offline": offline, "serve": serve, "turns": turns, "overhead": overhead}


def save(args: argparse.Namespace, data: dict[str, Any], *, partial: bool = False) -> None:
    """The section's figures so far (a section cut short still leaves what it measured)."""
    data = {**data, "size": "quick" if args.quick else "full", "partial": partial}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_default))
    tmp.replace(args.out)


def main() -> int:
    parser = argparse.ArgumentParser(description="one benchmark section, raw figures as JSON")
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="minimum size")
    parser.add_argument("--kvcache-gib", type=int, default=1)
    parser.add_argument("--preset", default="embedded", help="lanes preset (e.g. rtx4090)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--model", help="a model folder replacing the workhorse lane's model")
    parser.add_argument("--load-format", help="vLLM load_format, e.g. dummy (random weights)")
    args = parser.parse_args()
    began = time.monotonic()
    data = SECTIONS[args.section](args)
    data["section_wall_s"] = time.monotonic() - began
    save(args, data)
    progress(f"{args.section}: done in {data['section_wall_s']:.0f}s -> {args.out}")
    return 0


def _default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    sys.exit(main())
