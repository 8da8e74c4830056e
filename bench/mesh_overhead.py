"""Mesh overhead: the same scripted turns through the three services, each in its own
process, and through the whole agent in one process, on the same engine settings and the same
tools data. The bench's client (this process) talks AgentService gRPC to both:

- ``mesh``: ``python -m services.tools``, ``services.inference`` and ``services.orchestrator``,
  one process each, as ``agentmesh up`` starts them; the orchestrator reaches the other two
  over gRPC.
- ``inprocess``: ``python -m services.orchestrator.inprocess``, one process: the same
  orchestrator (AgentService, Agent.run_turn, the loop) over the inference core and the tool
  service called directly (services/orchestrator/inprocess.py).

Both read config/embedded.yaml (the embedded preset), listen on free 127.0.0.1 ports, keep
their SQLite stores (seeded with the same demo data) in a temporary folder and run one tool
round per turn. Both are placed alike on the CPU: tools and orchestrator start where
`agentmesh up` starts them (cli/placement.py); the inference service and the one process pin
themselves off the engine's OpenMP team once it started (services/inference/placement.py).
Both are up at once (one engine each; turns run on one of them at a time), so their blocks
alternate instead of running minutes apart: at one session every scripted turn runs on both
back to back, the order alternating; at N sessions each block of N sessions at once runs on
one then the other, the order alternating from block to block.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bench import turn_latency as tl
from bench.inference_vs_vllm_serve import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "embedded.yaml"
CONFIGS = ("mesh", "inprocess")
START_TIMEOUT_S = 600.0
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class Plan:
    levels: Sequence[int]  # concurrent sessions, e.g. [1, 10]
    turns: int  # turns of the one session at level 1
    turns_at_level: int  # turns per session at levels above 1
    blocks: int  # blocks per configuration at levels above 1
    kvcache_gib: int = 1
    preset: str = "embedded"


# ---- the two stacks ----------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Stack:
    name: str
    address: str  # the AgentService
    # The /metrics holding the inference service's series (the mesh's inference process,
    # the one process's own).
    metrics_port: int
    children: list[Child] = field(default_factory=list)
    startup_s: float = 0.0
    # Where its processes run (mesh: what `agentmesh up` would say).
    placement: str = ""

    async def refusals(self) -> float:
        """Requests the inference service refused at a full lane or engine so far (each
        retried by the orchestrator after its hint: seconds of waiting inside a turn)."""
        return await asyncio.to_thread(_counter, self.metrics_port, REFUSED)


REFUSED = "agentmesh_inference_rejected"


def _counter(port: int, name: str) -> float:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if sample.name == f"{name}_total"
    )


def _base_env(plan: Plan) -> dict[str, str]:
    """This environment without any AGENTMESH_ setting of its own, pointed at the config;
    only a placement the caller set (``AGENTMESH_<SERVICE>_CPU_AFFINITY``, empty: unpinned)
    is kept, and honoured as ``agentmesh up`` honours it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AGENTMESH_") or k.endswith("_CPU_AFFINITY")
    }
    return {
        **env,
        "AGENTMESH_CONFIG": str(CONFIG),
        "AGENTMESH_LOG_FORMAT": "text",
        "AGENTMESH_INFERENCE_PRESET": plan.preset,
    }


def _tools_env(folder: Path) -> dict[str, str]:
    return {
        "AGENTMESH_TOOLS_DATA_DIR": str(folder / "tools"),
        "AGENTMESH_TOOLS_METRICS_PORT": "0",
        "AGENTMESH_TOOLS_GRACE_SECONDS": "1",
    }


def _inference_env(folder: Path, plan: Plan) -> dict[str, str]:
    return {
        "AGENTMESH_INFERENCE_DATA_DIR": str(folder / "inference"),
        "AGENTMESH_INFERENCE_MODEL_CACHE_DIR": str(REPO / "var" / "models"),
        "AGENTMESH_INFERENCE_CPU_KVCACHE_GIB": str(plan.kvcache_gib),
        "AGENTMESH_INFERENCE_METRICS_PORT": "0",
        "AGENTMESH_INFERENCE_GRACE_SECONDS": "2",
    }


def _orchestrator_env(folder: Path, port: int, metrics_port: int = 0) -> dict[str, str]:
    return {
        "AGENTMESH_ORCHESTRATOR_PORT": str(port),
        "AGENTMESH_ORCHESTRATOR_METRICS_PORT": str(metrics_port),
        "AGENTMESH_ORCHESTRATOR_DATA_DIR": str(folder / "orchestrator"),
        "AGENTMESH_ORCHESTRATOR_GRACE_SECONDS": "2",
        "AGENTMESH_ORCHESTRATOR_SESSION_STORE_URL": (
            f"sqlite+aiosqlite:///{folder / 'sessions.sqlite'}"
        ),
        # One tool round per turn, as the turns section runs them.
        "AGENTMESH_ORCHESTRATOR_CAPS__MAX_ROUNDS_PER_TURN": "1",
    }


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


async def _spawn(name: str, module: str, env: dict[str, str], folder: Path) -> Child:
    from cli.supervisor import terminate_with_parent

    log = folder / f"{name}.log"
    with _open_log(log) as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=terminate_with_parent,
        )
    return Child(name, process, log)


async def start_mesh(folder: Path, plan: Plan) -> Stack:
    from cli.placement import mesh_placement

    base = _base_env(plan)
    ports = {name: free_port() for name in ("tools", "inference", "orchestrator", "metrics")}
    stack = Stack("mesh", f"127.0.0.1:{ports['orchestrator']}", ports["metrics"])
    specs = (  # start order, as `agentmesh up`
        ("tools", {**_tools_env(folder), "AGENTMESH_TOOLS_PORT": str(ports["tools"])}),
        (
            "inference",
            {
                **_inference_env(folder, plan),
                "AGENTMESH_INFERENCE_PORT": str(ports["inference"]),
                "AGENTMESH_INFERENCE_METRICS_PORT": str(ports["metrics"]),
            },
        ),
        (
            "orchestrator",
            {
                **_orchestrator_env(folder, ports["orchestrator"]),
                "AGENTMESH_ORCHESTRATOR_INFERENCE__TARGET": f"127.0.0.1:{ports['inference']}",
                "AGENTMESH_ORCHESTRATOR_TOOLS__TARGET": f"127.0.0.1:{ports['tools']}",
            },
        ),
    )
    # Tools and orchestrator on the cores off the engine's OpenMP team, as `agentmesh up`
    # starts them (the inference service and the one process pin themselves at engine start).
    placement = mesh_placement([name for name, _ in specs], base)
    stack.placement = placement.summary or "cpu placement: none"
    for name, own in specs:
        env = {**base, **own, **placement.env.get(name, {})}
        child = await _spawn(name, f"services.{name}", env, folder)
        stack.children.append(child)
    return stack


async def start_inprocess(folder: Path, plan: Plan) -> Stack:
    port, metrics_port = free_port(), free_port()
    env = {
        **_base_env(plan),
        **_tools_env(folder),
        **_inference_env(folder, plan),
        **_orchestrator_env(folder, port, metrics_port),  # one registry: every service's
    }
    stack = Stack("inprocess", f"127.0.0.1:{port}", metrics_port)
    # Like the mesh's inference service: pinned with its engine core off the OpenMP team once
    # the engine started (the inference settings' cpu_affinity "auto"; its log says where).
    stack.placement = "cpu placement: the process pins itself at engine start (cpu_affinity auto)"
    stack.children.append(await _spawn("inprocess", "services.orchestrator.inprocess", env, folder))
    return stack


async def wait_serving(stack: Stack, began: float, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until the stack's AgentService says SERVING (its dependencies warm); a child that
    exits meanwhile fails the start with its log's tail."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = began + timeout_s
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            for child in stack.children:
                if child.process.returncode is not None:
                    raise RuntimeError(
                        f"{stack.name}: {child.name} exited ({child.process.returncode}) "
                        f"while starting:\n{child.tail()}"
                    )
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    stack.startup_s = time.monotonic() - began
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{stack.name} not SERVING after {timeout_s:.0f}s")
            await asyncio.sleep(1.0)


async def stop(stack: Stack) -> None:
    """SIGTERM in reverse start order (orchestrator first), each its grace, then SIGKILL."""
    for child in reversed(stack.children):
        process = child.process
        if process.returncode is not None:
            continue
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            process.kill()
            await process.wait()


# ---- turns -------------------------------------------------------------------------------


def _row(config: str, sessions: int, block: int, sample: tl.TurnSample) -> dict[str, Any]:
    return {
        "config": config,
        "sessions": sessions,
        "block": block,
        "session": sample.session,
        "turn": sample.turn,
        **sample.row(),
    }


async def _sessions_at_once(
    stub: Any, config: str, level: int, turns: int
) -> tuple[list[tl.TurnSample], float]:
    """``level`` fresh sessions (scripts 0..level-1), each running ``turns`` turns, at once."""

    async def session(s: int) -> list[tl.TurnSample]:
        customer, messages = tl.script(s, turns)
        sid = await tl.new_session(stub, customer)
        return [
            await tl.run_turn(stub, sid, text, tl.TurnSample(config, s, t))
            for t, text in enumerate(messages)
        ]

    began = time.perf_counter()
    results = await asyncio.gather(*(session(s) for s in range(level)))
    return [x for r in results for x in r], time.perf_counter() - began


async def measure(
    plan: Plan,
    say: Callable[[str], None],
    save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    import grpc
    from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc

    out: dict[str, Any] = {
        "plan": {
            "levels": list(plan.levels),
            "turns": plan.turns,
            "turns_at_level": plan.turns_at_level,
            "blocks": plan.blocks,
        },
        "startup_s": {},
        "blocks": [],
        "turns": [],
    }
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-overhead-") as tmp:
        folder = Path(tmp)
        stacks: list[Stack] = []
        channels: list[grpc.aio.Channel] = []
        try:
            began = time.monotonic()
            stacks.append(await start_mesh(folder / "mesh", plan))
            stacks.append(await start_inprocess(folder / "inprocess", plan))
            await asyncio.gather(*(wait_serving(s, began) for s in stacks))
            for s in stacks:
                out["startup_s"][s.name] = s.startup_s
                out.setdefault("placement", {})[s.name] = s.placement
                say(f"overhead: {s.name} {s.placement}")
            say(
                "overhead: both up (mesh "
                f"{stacks[0].startup_s:.0f}s, in-process {stacks[1].startup_s:.0f}s)"
            )
            by_name = {s.name: s for s in stacks}
            stubs: dict[str, Any] = {}
            for s in stacks:
                channel = grpc.aio.insecure_channel(s.address)
                channels.append(channel)
                stubs[s.name] = orchestrator_pb2_grpc.AgentServiceStub(channel)
            customer, text = tl.WARM_UP
            for config in CONFIGS:  # engine, grammars, prefix cache, embeddings, SQL
                sid = await tl.new_session(stubs[config], customer)
                sample = await tl.run_turn(stubs[config], sid, text, tl.TurnSample(config, -1, -1))
                if not sample.ok:
                    raise RuntimeError(f"warm-up turn failed on {config}: {sample.error}")
                say(f"overhead: warm-up {config} {sample.wall:.1f}s")

            blocks = _Blocks(plan, by_name, stubs, out, say)
            for level in plan.levels:
                if level == 1:
                    await blocks.one_session()
                else:
                    await blocks.many_sessions(level)
                save(out)
        finally:
            for channel in channels:
                await channel.close()
            for s in reversed(stacks):
                await stop(s)
    return out


async def _one_turn(
    stub: Any, session_id: str, text: str, sample: tl.TurnSample
) -> tuple[list[tl.TurnSample], float]:
    """One turn of a kept session, as a block of one (its wall the turn's)."""
    await tl.run_turn(stub, session_id, text, sample)
    return [sample], sample.wall


@dataclass
class _Blocks:
    """Where the measured blocks run and what they are written to."""

    plan: Plan
    stacks: dict[str, Stack]
    stubs: dict[str, Any]
    out: dict[str, Any]
    say: Callable[[str], None]

    async def block(
        self,
        config: str,
        sessions: int,
        block: int,
        run: Awaitable[tuple[list[tl.TurnSample], float]],
    ) -> tuple[list[tl.TurnSample], float, float]:
        """One block on ``config``: its samples, wall and the full-lane refusals meanwhile
        (the block's row recorded; the turns' rows are the caller's)."""
        before = await self.stacks[config].refusals()
        samples, wall = await run
        refused = await self.stacks[config].refusals() - before
        self.out["blocks"].append(
            {
                "config": config,
                "sessions": sessions,
                "block": block,
                "wall": wall,
                "refusals": refused,
            }
        )
        return samples, wall, refused

    async def one_session(self) -> None:
        """The scripted task, each turn on both configurations back to back, order
        alternating."""
        customer, messages = tl.script(0, self.plan.turns)
        sessions = {c: await tl.new_session(self.stubs[c], customer) for c in CONFIGS}
        for t, text in enumerate(messages):
            for config in CONFIGS if t % 2 == 0 else CONFIGS[::-1]:
                sample = tl.TurnSample(config, 0, t)
                _, _, refused = await self.block(
                    config, 1, t, _one_turn(self.stubs[config], sessions[config], text, sample)
                )
                self.out["turns"].append({**_row(config, 1, t, sample), "refusals": refused})
                self.say(f"overhead: c=1 {sample.line()}")

    async def many_sessions(self, level: int) -> None:
        for block in range(self.plan.blocks):
            for config in CONFIGS if block % 2 == 0 else CONFIGS[::-1]:
                run = _sessions_at_once(self.stubs[config], config, level, self.plan.turns_at_level)
                samples, wall, refused = await self.block(config, level, block, run)
                self.out["turns"].extend(_row(config, level, block, x) for x in samples)
                ok = [x.wall for x in samples if x.ok]
                self.say(
                    f"overhead: c={level} {config} block {block + 1}: {len(ok)}/{len(samples)} "
                    f"turns in {wall:.1f}s, p50 {tl.percentile(ok, 0.5):.1f}s, "
                    f"{refused:.0f} full-lane refusals"
                )
