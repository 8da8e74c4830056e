"""Whole agent turns through the real mesh, stage by stage, beside the seed's GPU budget.

    python -m bench.turn_latency [--sessions 2] [--turns 3] [--concurrency 4] [--quick]

Default run ~5 minutes on a 2-core CPU (about one of them starting the mesh), --quick ~2.

Starts the three services in this process on 127.0.0.1 (ports 0), as ``make run`` would with
``config/embedded.yaml``: the inference service on the embedded SmolLM2-135M engine (model
cache ``var/models``), the tool service on fresh SQLite stores seeded with the demo data, and
TWO orchestrators over the same inference and tool services that differ in one knob only,
``profile.parallel_tool_calls`` (true: one grammar-constrained generation per tool, batched
by the engine; false: one generation that writes all calls in order). Session stores are
SQLite files in a temporary folder. Then, through gRPC ``RunTurn``:

- warm-up: one turn per orchestrator, together (not counted);
- A/B: ``--sessions`` scripted customer-success conversations (CUST-0001..CUST-0003) of
  ``--turns`` turns each, every turn run on both orchestrators back to back (alternating
  which goes first), so both see the same machine state. Printed: client-side turn wall and
  first-answer-delta p50 / p95 and the per-stage breakdown of ``TurnCompleted.latency``
  beside the seed's reference numbers (a GPU: Qwen2.5-14B-AWQ at 135 tokens/s on an RTX
  4090, NOT measured here), and the ratio sequential / parallel emission;
- concurrency: N fresh sessions running turns at once on the parallel orchestrator, against
  the same turns run one at a time in the A/B phase: turns/min and p95, ratio N / 1.

Turns have the seed's shape: plan -> three parallel reads (CRM, KB, billing) -> observe ->
streamed compose, one tool round (``--rounds`` to allow more). The seed's column is a 14B model
on a GPU, ours a 135M model on a CPU: compare the shape of the stages with it, not the seconds.
Numbers on a shared 2-core CPU are noisy: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "embedded.yaml"
MODES = ("parallel", "sequential")  # profile.parallel_tool_calls true / false

# One scripted conversation per demo customer (README: CUST-0001 charged twice, CUST-0002 a
# failed payment and past due, CUST-0003 moved from Growth to Business). No message asks for a
# refund or credit, so the write gate never lets a write tool run.
SCRIPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "CUST-0001",
        (
            "Hi, I think I was charged twice on my last invoice. Can you check?",
            "Which invoice was it, and how much was the duplicate charge?",
            "What does your policy say about duplicate charges?",
        ),
    ),
    (
        "CUST-0002",
        (
            "My last card payment failed and my account says past due. What happened?",
            "How much do I owe right now, and by when?",
            "How do I update my card so the next payment goes through?",
        ),
    ),
    (
        "CUST-0003",
        (
            "I moved from the Growth plan to Business. Why is this month's invoice higher?",
            "How does proration work when I upgrade in the middle of a cycle?",
            "Is my subscription active, and which features come with Business?",
        ),
    ),
)
# Turns beyond a script's own (--turns > 3), in order, then cycled.
FOLLOW_UPS = (
    "Is my subscription still active, and which plan am I on?",
    "Thanks. What should I do if this happens again?",
)
WARM_UP = ("CUST-0001", "Hello, can you check the status of my account?")

# The seed playbook's per-turn budget (Qwen2.5-14B-AWQ at 135 tokens/s on an RTX 4090, prefix
# cache primed): its stage table and worked budget. Reference only, nothing measured here.
STAGES = ("plan", "tool_emit", "tool_wall", "observe", "compose", "queue_prefill", "network")
SEED_GPU: dict[str, str] = {
    "plan": "0.89",  # 120 tokens
    "tool_emit": "0.59",  # 3 x 80 tokens, batched
    "tool_wall": "0.35",  # max of CRM 0.20 / RAG 0.35 / billing 0.25
    "observe": "0.05",
    "compose": "1.85",  # 250 tokens
    "queue_prefill": "0.10",  # prefix cached
    "network": "0.20",
    "total": "4.08",  # worked budget (books 0.40 for prefill + network together)
    "wall": "4-5 p95",  # the per-turn budget
    "first_delta": "-",
}
LABELS: dict[str, str] = {
    "plan": "plan",
    "tool_emit": "tool emit",
    "tool_wall": "tool wall",
    "observe": "observe",
    "compose": "compose",
    "queue_prefill": "queue + prefill (TTFT)",
    "network": "network",
    "total": "total (server)",
    "wall": "turn wall (client)",
    "first_delta": "first answer delta (client)",
}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank, as the other benchmarks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "-"


def seconds(value: Any) -> float:
    return float(value.seconds + value.nanos / 1e9)


def script(session: int, turns: int) -> tuple[str, list[str]]:
    """Customer and messages of scripted session ``session`` (deterministic)."""
    customer, own = SCRIPTS[session % len(SCRIPTS)]
    pool = [*own, *FOLLOW_UPS]
    return customer, [pool[i % len(pool)] for i in range(turns)]


@dataclass
class TurnSample:
    mode: str
    session: int
    turn: int
    wall: float = math.nan
    first_delta: float = math.nan
    stages: dict[str, float] = field(default_factory=dict)
    outcome: str = ""
    tool_calls: int = 0
    tools_ok: int = 0
    escalations: int = 0
    completion_tokens: int = 0
    llm_stages: int = 0
    # The longest tool call of the turn as the tool service timed it (its own time).
    tool_self: float = 0.0
    notes: list[str] = field(default_factory=list)
    failed_calls: list[tuple[str, str, str]] = field(default_factory=list)  # name, status, args
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def row(self) -> dict[str, Any]:
        """The turn's figures as the sections' raw JSON keeps them."""
        return {
            "ok": self.ok,
            "error": self.error,
            "wall": self.wall,
            "first_delta": self.first_delta,
            "stages": self.stages,
            "outcome": self.outcome,
            "tool_calls": self.tool_calls,
            "llm_stages": self.llm_stages,
            "completion_tokens": self.completion_tokens,
            "tool_self": self.tool_self,
        }

    def line(self) -> str:
        if self.error:
            return f"{self.mode:<10} s{self.session + 1} t{self.turn + 1}  ERROR {self.error}"
        s = self.stages
        return (
            f"{self.mode:<10} s{self.session + 1} t{self.turn + 1} {self.wall:6.1f}s  "
            f"plan {s['plan']:.1f} emit {s['tool_emit']:.1f} tools {s['tool_wall']:.2f} "
            f"compose {s['compose']:.1f}  {self.outcome.lower()} "
            f"calls {self.tools_ok}/{self.tool_calls} esc {self.escalations} "
            f"tok {self.completion_tokens}"
        )


# ---- the mesh ------------------------------------------------------------------------------


@dataclass
class Mesh:
    stubs: dict[str, Any]  # mode -> AgentServiceStub
    startup_s: float


@asynccontextmanager
async def mesh(
    args: argparse.Namespace,
    folder: Path,
    modes: Sequence[str] = MODES,
    exporter: Any = None,
) -> AsyncIterator[Mesh]:
    """The mesh; ``exporter`` (an OpenTelemetry SpanExporter) gets the orchestrators' spans."""
    import grpc
    from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc

    from services.inference.config import InferenceSettings
    from services.inference.service import InferenceService
    from services.orchestrator.config import OrchestratorSettings
    from services.orchestrator.service import OrchestratorService
    from services.tools.config import ToolsSettings, enforce_offline_models
    from services.tools.service import ToolsService
    from shared.config import load_settings, read_config_section
    from shared.server import GrpcServer
    from shared.telemetry import Telemetry

    enforce_offline_models()
    common: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0}
    tools_settings = load_settings(
        ToolsSettings, "tools", CONFIG, **common, data_dir=folder / "tools", grace_seconds=1.0
    )
    inference_settings = load_settings(
        InferenceSettings,
        "inference",
        CONFIG,
        **common,
        data_dir=folder / "inference",
        model_cache_dir=REPO / "var" / "models",
        cpu_kvcache_gib=args.kvcache_gib,
        grace_seconds=2.0,
    )
    tools_service = ToolsService(tools_settings)
    backends = [
        GrpcServer(tools_service, tools_settings, metrics_registry=tools_service.metrics_registry),
        GrpcServer(InferenceService(inference_settings), inference_settings),
    ]
    servers: list[GrpcServer] = []  # started ones, stopped in reverse order
    channels: list[grpc.aio.Channel] = []
    started = time.perf_counter()
    try:
        for server in backends:
            await server.start()
            servers.append(server)
        tools_address, inference_address = (s.address for s in backends)
        section = read_config_section(CONFIG, "orchestrator")
        stubs: dict[str, Any] = {}
        for mode in modes:
            settings = load_settings(
                OrchestratorSettings,
                "orchestrator",
                CONFIG,
                **common,
                data_dir=folder / f"orchestrator-{mode}",
                grace_seconds=2.0,
                inference={"target": inference_address},
                tools={"target": tools_address},
                session_store_url=f"sqlite+aiosqlite:///{folder / f'sessions-{mode}.sqlite'}",
                caps={**section.get("caps", {}), "max_rounds_per_turn": args.rounds},
                profile={**section.get("profile", {}), "parallel_tool_calls": mode == "parallel"},
            )
            telemetry = Telemetry.with_exporter(exporter) if exporter is not None else None
            server = GrpcServer(OrchestratorService(settings, telemetry=telemetry), settings)
            await server.start()
            servers.append(server)
            channel = grpc.aio.insecure_channel(server.address)
            channels.append(channel)
            stubs[mode] = orchestrator_pb2_grpc.AgentServiceStub(channel)
        await asyncio.gather(*(s.wait_until_serving(900) for s in servers))
        yield Mesh(stubs, time.perf_counter() - started)
    finally:
        for channel in channels:
            await channel.close()
        for server in reversed(servers):  # orchestrators, then inference, then tools
            await server.stop(grace=1)


# ---- turns ---------------------------------------------------------------------------------


async def new_session(stub: Any, customer: str) -> str:
    from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb

    reply = await stub.CreateSession(pb.CreateSessionRequest(customer_id=customer), timeout=60)
    return str(reply.session.session_id)


async def run_turn(stub: Any, session_id: str, text: str, sample: TurnSample) -> TurnSample:
    """One RunTurn, consumed to the end; the sample gets the client and server timings."""
    import grpc
    from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb

    sent = time.perf_counter()
    try:
        call = stub.RunTurn(
            pb.RunTurnRequest(session_id=session_id, user_message=text), timeout=900
        )
        async for event in call:
            kind = event.WhichOneof("event")
            if kind == "compose_delta" and math.isnan(sample.first_delta):
                sample.first_delta = time.perf_counter() - sent
            elif kind == "tool_call_finished":
                finished = event.tool_call_finished
                sample.tool_self = max(sample.tool_self, seconds(finished.latency))
                if finished.status == "OK":
                    sample.tools_ok += 1
                else:
                    sample.failed_calls.append(
                        (finished.name, finished.status, finished.arguments_json)
                    )
            elif kind == "escalation":
                sample.escalations += 1
            elif kind == "turn_completed":
                done = event.turn_completed
                sample.wall = time.perf_counter() - sent
                sample.stages = {s: seconds(getattr(done.latency, s)) for s in STAGES}
                sample.stages["total"] = seconds(done.latency.total)
                sample.outcome = pb.TurnOutcome.Name(done.outcome).removeprefix("TURN_OUTCOME_")
                sample.tool_calls = done.tool_calls
                sample.completion_tokens = sum(u.usage.completion_tokens for u in done.usage)
                sample.notes = list(done.notes)
                sample.llm_stages = done.llm_stages
        if math.isnan(sample.wall):
            sample.error = "the stream ended without turn_completed"
    except grpc.aio.AioRpcError as error:
        sample.error = f"{error.code().name}: {error.details()}"
    return sample


async def warm_up(m: Mesh) -> None:
    """One turn per orchestrator, together: engine, grammars, prefix cache, MiniLM, SQL."""
    customer, text = WARM_UP
    began = time.perf_counter()

    async def one(mode: str) -> TurnSample:
        session_id = await new_session(m.stubs[mode], customer)
        return await run_turn(m.stubs[mode], session_id, text, TurnSample(mode, -1, -1))

    samples = await asyncio.gather(*(one(mode) for mode in MODES))
    for sample in samples:
        if sample.error:
            raise RuntimeError(f"warm-up turn failed ({sample.mode}): {sample.error}")
    print(f"warm-up: one turn per orchestrator, together: {time.perf_counter() - began:.1f}s")


async def ab_phase(m: Mesh, args: argparse.Namespace) -> list[TurnSample]:
    """Every scripted turn on both orchestrators, back to back, alternating the order."""
    samples: list[TurnSample] = []
    for s in range(args.sessions):
        customer, messages = script(s, args.turns)
        sessions = {mode: await new_session(m.stubs[mode], customer) for mode in MODES}
        for t, text in enumerate(messages):
            order = MODES if (s * args.turns + t) % 2 == 0 else MODES[::-1]
            for mode in order:
                sample = await run_turn(m.stubs[mode], sessions[mode], text, TurnSample(mode, s, t))
                samples.append(sample)
                print(f"  {customer} {sample.line()}", flush=True)
    return samples


async def concurrent_phase(m: Mesh, level: int, turns: int) -> tuple[list[TurnSample], float]:
    """``level`` fresh sessions, each running its first ``turns`` scripted turns, all at once."""
    stub = m.stubs["parallel"]

    async def session(s: int) -> list[TurnSample]:
        customer, messages = script(s, turns)
        session_id = await new_session(stub, customer)
        out = []
        for t, text in enumerate(messages):
            out.append(await run_turn(stub, session_id, text, TurnSample("parallel", s, t)))
        return out

    began = time.perf_counter()
    results = await asyncio.gather(*(session(s) for s in range(level)))
    wall = time.perf_counter() - began
    samples = [sample for result in results for sample in result]
    for sample in samples:
        print(f"  c={level} {sample.line()}", flush=True)
    return samples, wall


# ---- report --------------------------------------------------------------------------------


def column(samples: Sequence[TurnSample], key: str) -> list[float]:
    if key == "wall":
        return [s.wall for s in samples]
    if key == "first_delta":
        return [s.first_delta for s in samples if not math.isnan(s.first_delta)]
    return [s.stages[key] for s in samples]


def report_ab(samples: list[TurnSample]) -> None:
    by_mode = {mode: [s for s in samples if s.mode == mode and s.ok] for mode in MODES}
    par, seq = by_mode["parallel"], by_mode["sequential"]
    print(
        f"\nper-turn latency by stage, seconds (n = {len(par)} parallel, {len(seq)} sequential "
        "turns; p50 / p95 nearest rank)"
    )
    print(
        "seed GPU ref = the seed playbook's budget for Qwen2.5-14B-AWQ at 135 tokens/s on an RTX "
        "4090;\nit is NOT measured here (ours: SmolLM2-135M on this CPU)."
    )
    header = (
        f"{'stage':<28} {'seed GPU ref':>12} {'par p50':>8} {'par p95':>8} "
        f"{'seq p50':>8} {'seq p95':>8} {'seq/par p50':>12}"
    )
    print(header)
    print("-" * len(header))
    for key in (*STAGES, "total", "wall", "first_delta"):
        p, q = column(par, key), column(seq, key)
        print(
            f"{LABELS[key]:<28} {SEED_GPU[key]:>12} {percentile(p, 0.5):>8.2f} "
            f"{percentile(p, 0.95):>8.2f} {percentile(q, 0.5):>8.2f} {percentile(q, 0.95):>8.2f} "
            f"{ratio(percentile(q, 0.5), percentile(p, 0.5)):>12}"
        )
    print(
        "queue + prefill (time to first token of every generation) and network (call wall minus "
        "server time)\nare parts of plan / tool emit / compose, as in the seed's table: stages do "
        "not add up to the total."
    )

    print(
        "\nwhat parallel tool-call emission buys (sequential / parallel; > 1: parallel is faster)"
    )
    for key, label in (("tool_emit", "tool emit"), ("wall", "turn wall")):
        p, q = column(par, key), column(seq, key)
        print(
            f"  {label:<10} p50 {percentile(p, 0.5):6.2f}s vs {percentile(q, 0.5):6.2f}s "
            f"-> {ratio(percentile(q, 0.5), percentile(p, 0.5))}   "
            f"p95 {percentile(p, 0.95):6.2f}s vs {percentile(q, 0.95):6.2f}s "
            f"-> {ratio(percentile(q, 0.95), percentile(p, 0.95))}"
        )
    for mode, group in by_mode.items():
        if not group:
            continue
        outcomes = Counter(s.outcome.lower() for s in group)
        print(
            f"  {mode:<10} tool calls ok {sum(s.tools_ok for s in group)}/"
            f"{sum(s.tool_calls for s in group)}, escalations "
            f"{sum(s.escalations for s in group)}, completion tokens/turn "
            f"{statistics.mean(s.completion_tokens for s in group):.0f}, outcomes "
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        )
    failed = [s for s in samples if not s.ok]
    for s in failed:
        print(f"  failed turn (not counted): {s.line()}")
    examples: dict[tuple[str, str, str], str] = {}
    for s in samples:
        for name, status, arguments in s.failed_calls:
            examples.setdefault((s.mode, name, status), arguments)
    counts = Counter((s.mode, n, st) for s in samples for n, st, _ in s.failed_calls)
    for (mode, name, status), count in sorted(counts.items()):
        example = examples[(mode, name, status)][:100]
        print(f"  {mode:<10} {name} {status} x{count}, e.g. arguments {example}")
    notes = Counter(n for s in samples if s.ok for n in s.notes)
    for note, count in notes.most_common(5):
        print(f"  note x{count}: {note}")


def report_concurrency(
    baseline: list[TurnSample], runs: list[tuple[int, list[TurnSample], float]]
) -> None:
    print(
        "\nconcurrency (parallel emission; c=1: the same scripted turns run one at a time in "
        "the A/B phase)"
    )
    header = (
        f"{'sessions at once':>16} {'turns':>6} {'wall s':>8} {'turns/min':>10} "
        f"{'p50 s':>7} {'p95 s':>7}"
    )
    print(header)
    print("-" * len(header))
    base_walls = [s.wall for s in baseline]
    base_rate = 60 * len(base_walls) / sum(base_walls) if base_walls else math.nan
    print(
        f"{1:>16} {len(base_walls):>6} {sum(base_walls):>8.1f} {base_rate:>10.2f} "
        f"{percentile(base_walls, 0.5):>7.1f} {percentile(base_walls, 0.95):>7.1f}"
    )
    for level, samples, wall in runs:
        walls = [s.wall for s in samples if s.ok]
        rate = 60 * len(walls) / wall
        print(
            f"{level:>16} {len(walls):>6} {wall:>8.1f} {rate:>10.2f} "
            f"{percentile(walls, 0.5):>7.1f} {percentile(walls, 0.95):>7.1f}"
        )
        failed = len(samples) - len(walls)
        print(
            f"  c={level} vs c=1: turns/min {ratio(rate, base_rate)} (> 1: more throughput), "
            f"p95 turn wall {ratio(percentile(walls, 0.95), percentile(base_walls, 0.95))} "
            f"(> 1: slower turns)" + (f", {failed} failed turns not counted" if failed else "")
        )


# ---- main ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    print(
        f"turn latency: {args.sessions} session(s) x {args.turns} turn(s) per mode, "
        f"{args.rounds} tool round(s) per turn, concurrency levels {args.concurrency}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-turns-") as folder:
        async with mesh(args, Path(folder)) as m:
            print(f"mesh up (engine, seeded stores, 2 orchestrators): {m.startup_s:.1f}s")
            await warm_up(m)
            print("A/B phase: every turn on the parallel and the sequential orchestrator")
            samples = await ab_phase(m, args)
            runs: list[tuple[int, list[TurnSample], float]] = []
            levels = [level for level in args.concurrency if level > 1]
            turns = min(args.concurrent_turns, args.turns)
            for level in levels:
                print(f"concurrency phase: {level} sessions x {turns} turn(s) at once")
                level_samples, wall = await concurrent_phase(m, level, turns)
                runs.append((level, level_samples, wall))
    report_ab(samples)
    if runs:
        baseline = [s for s in samples if s.mode == "parallel" and s.ok and s.turn < turns]
        report_concurrency(baseline, runs)
    print(f"\nbenchmark wall time: {time.perf_counter() - began:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, help="scripted conversations (default 2)")
    parser.add_argument("--turns", type=int, help="turns per conversation (default 3)")
    parser.add_argument(
        "--concurrency",
        type=lambda s: sorted({int(x) for x in s.split(",")}),
        help="sessions running turns at once, e.g. 4 or 1,4; 1 alone skips the phase (default 4)",
    )
    parser.add_argument(
        "--concurrent-turns", type=int, default=1, help="turns per session at concurrency > 1"
    )
    parser.add_argument("--rounds", type=int, default=1, help="tool rounds per turn (max)")
    parser.add_argument("--kvcache-gib", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="smallest run: 1 session x 1 turn, no concurrency"
    )
    args, _unknown = parser.parse_known_args()  # `make bench` passes every bench its args
    # Explicit flags win over --quick's smaller defaults.
    args.sessions = args.sessions or (1 if args.quick else 2)
    args.turns = args.turns or (1 if args.quick else 3)
    args.concurrency = args.concurrency or ([1] if args.quick else [1, 4])
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
