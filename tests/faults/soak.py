"""``make soak``: the embedded mesh (``agentmesh up``, real engine) under concurrent sessions
for a bounded time, loopback only.

Each of ``--sessions`` workers opens a session and runs turns back to back (each with its own
request id); a RESOURCE_EXHAUSTED with a RetryInfo is honoured (wait, retry the same request
id) and counted. At the end it prints turns completed, errors by status, p50/p95 turn time,
resident memory of each service at start and end, and the engine's unfinished requests once
the load stopped. Exit status 1 when any error other than RESOURCE_EXHAUSTED-with-a-hint was
seen, or the engine still tracks requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.faults.procs import REPO, free_port, until_health

QUESTIONS = [
    "Why was I charged twice this month?",
    "What is your refund policy?",
    "Can you check my latest invoice?",
    "How do I update my payment method?",
    "Thanks, that helps.",
]


@dataclass
class Tally:
    turns: int = 0
    durations: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    hinted_retries: int = 0


def _retry_after_s(err: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(err)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToMilliseconds()) / 1000
    return None


async def _worker(index: int, address: str, until: float, tally: Tally) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        customer = f"CUST-{index % 200 + 1:04d}"
        session = await stub.CreateSession(
            pb.CreateSessionRequest(customer_id=customer), timeout=30
        )
        sid = session.session.session_id
        turn = 0
        while time.monotonic() < until:
            request_id = f"soak-{index}-{turn}"
            text = QUESTIONS[turn % len(QUESTIONS)]
            started = time.monotonic()
            while True:
                completed = False
                try:
                    request = pb.RunTurnRequest(
                        session_id=sid, user_message=text, request_id=request_id
                    )
                    async for event in stub.RunTurn(request, timeout=600):
                        if event.HasField("turn_completed"):
                            completed = True
                            outcome = pb.TurnOutcome.Name(event.turn_completed.outcome)
                            tally.outcomes[outcome.removeprefix("TURN_OUTCOME_")] += 1
                except grpc.aio.AioRpcError as err:
                    hint = _retry_after_s(err)
                    if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and hint is not None:
                        tally.hinted_retries += 1
                        tally.errors["RESOURCE_EXHAUSTED (with retry hint)"] += 1
                        await asyncio.sleep(hint)
                        continue
                    tally.errors[err.code().name] += 1
                    break
                if not completed:  # an OK stream without its TurnCompleted: a lost turn
                    tally.errors["OK without turn_completed"] += 1
                    break
                tally.turns += 1
                tally.durations.append(time.monotonic() - started)
                break
            turn += 1


def _rss_mb(pid: int, tree: bool) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *(root.children(recursive=True) if tree else [])]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
    except psutil.Error:
        return 0.0


def _services(up: psutil.Process) -> dict[str, int]:
    found: dict[str, int] = {}
    for child in up.children():
        cmd = " ".join(child.cmdline())
        for name in ("tools", "inference", "orchestrator"):
            if f"services.{name}" in cmd:
                found[name] = child.pid
    return found


def _unfinished(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = re.findall(
        r"^agentmesh_inference_engine_unfinished_requests\{[^}]*\} (\S+)$", text, re.M
    )
    return sum(float(v) for v in values)


async def soak(sessions: int, duration_s: float) -> int:
    ports = {name: free_port() for name in ("orchestrator", "inference", "tools")}
    metrics = free_port()
    data = Path(tempfile.mkdtemp(prefix="agentmesh-soak-"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")},
        "AGENTMESH_DATA_DIR": str(data),
        "AGENTMESH_TOOLS_DATA_DIR": str(data),
        "AGENTMESH_ORCHESTRATOR_DATA_DIR": str(data),
        "AGENTMESH_INFERENCE_MODEL_CACHE_DIR": str(REPO / "var" / "models"),
        "AGENTMESH_INFERENCE_METRICS_PORT": str(metrics),
        "AGENTMESH_TOOLS_METRICS_PORT": "0",
        "AGENTMESH_ORCHESTRATOR_METRICS_PORT": "0",
        "AGENTMESH_ORCHESTRATOR_INFERENCE__TARGET": f"127.0.0.1:{ports['inference']}",
        "AGENTMESH_ORCHESTRATOR_TOOLS__TARGET": f"127.0.0.1:{ports['tools']}",
        **{f"AGENTMESH_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    up = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "up",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        print(f"soak: mesh starting (data in {data}) ...", flush=True)
        for port in ports.values():
            await until_health(f"127.0.0.1:{port}", serving=True, timeout_s=900)
        pids = _services(psutil.Process(up.pid))
        start_rss = {n: _rss_mb(p, n == "inference") for n, p in pids.items()}
        print(f"soak: {sessions} sessions for {duration_s:.0f} s", flush=True)
        tally = Tally()
        until = time.monotonic() + duration_s
        address = f"127.0.0.1:{ports['orchestrator']}"
        workers = [_worker(i, address, until, tally) for i in range(sessions)]
        await asyncio.gather(*workers)
        end_rss = {n: _rss_mb(p, n == "inference") for n, p in pids.items()}
        unfinished = _unfinished(metrics)
        for _ in range(120):  # in-flight aborts settle within moments
            if unfinished == 0:
                break
            await asyncio.sleep(0.5)
            unfinished = _unfinished(metrics)
        durations = sorted(tally.durations)
        p50 = statistics.median(durations) if durations else 0.0
        p95 = durations[int(0.95 * (len(durations) - 1))] if durations else 0.0
        print(f"turns completed: {tally.turns}")
        print(f"turn outcomes: {dict(tally.outcomes)}")
        print(f"errors by status: {dict(tally.errors) or 'none'}")
        print(f"turn time: p50 {p50:.1f} s, p95 {p95:.1f} s")
        for name in pids:
            print(
                f"resident memory {name}: {start_rss[name]:.0f} MiB at start, "
                f"{end_rss[name]:.0f} MiB at end"
            )
        print(f"engine unfinished requests at the end: {unfinished:.0f}")
        bad = {k: v for k, v in tally.errors.items() if "with retry hint" not in k}
        return 0 if not bad and unfinished == 0 and tally.turns > 0 else 1
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(up.wait(), 120)
            except TimeoutError:
                up.kill()
                await up.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=300.0)
    args = parser.parse_args()
    return asyncio.run(soak(args.sessions, args.duration_s))


if __name__ == "__main__":
    raise SystemExit(main())
