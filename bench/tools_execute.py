"""Tool service latency and throughput on the embedded stores (SQLite + local index + MiniLM).

    python -m bench.tools_execute [--iterations 40] [--duration 5] [--concurrency 1,4,8]

Starts the tool service in this process on 127.0.0.1 (port 0) with a fresh, seeded data
directory, then measures through gRPC, with the agent's turn shape (CRM lookup + KB search
+ billing lookup):

- per tool: one ExecuteTool at a time, p50 / p95;
- a turn as ONE ExecuteTools batch of 3 vs as 3 sequential ExecuteTool calls, p50 / p95,
  and the ratio sequential / batch (> 1 means the batch's concurrency pays off);
- throughput: batches/s and tool calls/s with N clients issuing batches back to back.

Numbers on a shared 2-core CPU are noisy: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.tools.config import ToolsSettings, enforce_offline_models
from services.tools.service import ToolsService
from shared.server import GrpcServer

QUERIES = [
    "I was charged twice this month",
    "why did my card payment fail",
    "how does proration work when I upgrade",
    "SSO login fails with an invalid audience",
    "webhooks are not delivered",
    "can I get a refund after cancelling",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def turn(i: int) -> list[tools_pb2.ToolInvocation]:
    customer = f"CUST-{(i % 200) + 1:04d}"
    return [
        tools_pb2.ToolInvocation(
            call_id=f"crm-{i}",
            name="crm_lookup",
            arguments_json=json.dumps({"customer_id": customer}),
        ),
        tools_pb2.ToolInvocation(
            call_id=f"kb-{i}",
            name="kb_search",
            arguments_json=json.dumps({"query": QUERIES[i % len(QUERIES)], "top_k": 3}),
        ),
        tools_pb2.ToolInvocation(
            call_id=f"bill-{i}",
            name="billing_lookup",
            arguments_json=json.dumps({"customer_id": customer}),
        ),
    ]


async def timed(samples: list[float], fn: Callable[[], Awaitable[Any]]) -> None:
    start = time.perf_counter()
    await fn()
    samples.append(time.perf_counter() - start)


def row(label: str, samples: list[float]) -> str:
    p50, p95 = percentile(samples, 0.5) * 1000, percentile(samples, 0.95) * 1000
    return f"{label:<34} {p50:>9.1f} {p95:>9.1f} {len(samples):>6}"


async def run(args: argparse.Namespace) -> None:
    enforce_offline_models()
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-tools-") as folder:
        settings = ToolsSettings(port=0, metrics_port=0, data_dir=Path(folder))
        service = ToolsService(settings)
        server = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
        started = time.perf_counter()
        await server.start()
        await server.wait_until_serving(600)
        print(
            f"warm-up (seed 200 customers, embed 64 articles, load MiniLM): "
            f"{time.perf_counter() - started:.1f}s"
        )
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = tools_pb2_grpc.ToolServiceStub(channel)
                await measure(stub, args)
        finally:
            await server.stop(grace=1)


async def measure(stub: Any, args: argparse.Namespace) -> None:
    # warm the paths (first query per kind compiles SQL, first encode allocates)
    for i in range(3):
        await stub.ExecuteTools(tools_pb2.ExecuteToolsRequest(invocations=turn(i)), timeout=60)

    per_tool: dict[str, list[float]] = {"crm_lookup": [], "kb_search": [], "billing_lookup": []}
    batch: list[float] = []
    sequential: list[float] = []
    for i in range(args.iterations):
        invocations = turn(i)
        for inv in invocations:
            await timed(
                per_tool[inv.name],
                lambda inv=inv: stub.ExecuteTool(
                    tools_pb2.ExecuteToolRequest(invocation=inv), timeout=60
                ),
            )
        await timed(
            batch,
            lambda inv=invocations: stub.ExecuteTools(
                tools_pb2.ExecuteToolsRequest(invocations=inv), timeout=60
            ),
        )

        async def one_by_one(inv: list[tools_pb2.ToolInvocation] = invocations) -> None:
            for call in inv:
                await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(invocation=call), timeout=60)

        await timed(sequential, one_by_one)

    print(f"\n{'latency (ms)':<34} {'p50':>9} {'p95':>9} {'n':>6}")
    for name, samples in per_tool.items():
        print(row(f"ExecuteTool {name}", samples))
    print(row("turn: ExecuteTools batch of 3", batch))
    print(row("turn: 3 sequential ExecuteTool", sequential))
    ratio50 = statistics.median(sequential) / statistics.median(batch)
    ratio95 = percentile(sequential, 0.95) / percentile(batch, 0.95)
    print(f"ratio sequential / batch: p50 {ratio50:.2f}x, p95 {ratio95:.2f}x")

    print(f"\n{'throughput':<20} {'clients':>8} {'batches/s':>10} {'calls/s':>9} {'p50 ms':>8}")
    for clients in args.concurrency:
        done, latencies, elapsed = await saturate(stub, clients, args.duration)
        print(
            f"{'ExecuteTools x3':<20} {clients:>8} {done / elapsed:>10.1f} "
            f"{3 * done / elapsed:>9.1f} {percentile(latencies, 0.5) * 1000:>8.1f}"
        )


async def saturate(stub: Any, clients: int, duration: float) -> tuple[int, list[float], float]:
    """``clients`` loops issuing batches back to back for ``duration`` seconds."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration
    counts = [0] * clients

    async def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            invocations = turn(i)
            await timed(
                latencies,
                lambda invocations=invocations: stub.ExecuteTools(
                    tools_pb2.ExecuteToolsRequest(invocations=invocations), timeout=60
                ),
            )
            counts[offset] += 1
            i += clients

    began = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return sum(counts), latencies, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8]
    )
    args, _unknown = parser.parse_known_args()  # `make bench` passes every bench its args
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
