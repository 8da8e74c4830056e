"""Two REAL inference processes hosting different lanes behind one orchestrator: workhorse in
one, planner and heavy in the other (one engine each, the embedded SmolLM2). The workhorse's
tool calls are cut to 4 tokens (a per-lane override), so under any model output they fail
validation; the re-prompt fails the same way; the escalation to planner goes to the other
process, whose calls (200 tokens, grammar-constrained: a 200-character query fits) are
valid. The events record it.

The second process hosts workhorse too (the embedded lanes share one engine, so a replica costs
no second engine): with both processes in workhorse's pool, the same two engines show what the
fake-based affinity test (test_topology.py) simulates, on vLLM's real prefix cache: a session's
next prompt sent to the replica rendezvous hashing picks for it finds its earlier prompt cached
there, while the other replica (where round-robin would send it) has only the shared system
prompt. Single-token generations: seconds on top of the escalation turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.inference.config import InferenceSettings
from services.inference.service import InferenceService
from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.loop.policy import Caps
from services.orchestrator.service import OrchestratorService
from services.orchestrator.topology.directory import LaneDirectory
from services.orchestrator.topology.rendezvous import affinity_key
from services.orchestrator.topology.settings import TopologySettings
from shared.config import load_settings
from shared.server import GrpcServer
from tests.orchestrator.grpc_fakes import start_fake

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def inference(hosted: list[str]) -> GrpcServer:
    settings = load_settings(
        InferenceSettings,
        "inference",
        port=0,
        metrics_port=0,
        preset="embedded",
        hosted_lanes=hosted,
        model_cache_dir=REPO / "var" / "models",
        cpu_kvcache_gib=1,
        grace_seconds=2.0,
    )
    return GrpcServer(InferenceService(settings), settings)


SYSTEM = "You are the support assistant of Lumen. Answer briefly and politely."


def conversation(session: int, turns: int) -> list[common_pb2.ChatMessage]:
    """A session's prompt after ``turns`` turns: one system prompt shared by every session,
    then a history of its own (~40 tokens a turn, distinct per session)."""
    messages = [common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=SYSTEM)]
    for turn in range(turns):
        messages += [
            common_pb2.ChatMessage(
                role=common_pb2.ROLE_USER,
                content=f"Session {session}, question {turn}: invoice INV-{session}{turn:03d} "
                f"shows seat count {7 * session + turn} and a charge of {13 * turn + session} "
                "euros; which of my plan's seats does it cover?",
            ),
            common_pb2.ChatMessage(
                role=common_pb2.ROLE_ASSISTANT,
                content=f"For session {session} the invoice covers seats {turn} to {turn + 9}.",
            ),
        ]
    return messages


async def cached_tokens(address: str, messages: list[common_pb2.ChatMessage]) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            inference_pb2.GenerateRequest(
                messages=messages,
                lane=inference_pb2.LaneSelector(lane="workhorse"),
                sampling=inference_pb2.SamplingParams(max_tokens=1, temperature=0.0),
            ),
            timeout=600,
        )
    return int(reply.usage.cached_prompt_tokens)


def engine_sample(server: GrpcServer, name: str) -> float:
    """A sample of the engine metrics vLLM's stat logger feeds (services/inference/
    engine_stats.py), summed over its labels, from the service's own registry."""
    assert isinstance(server.service, InferenceService)
    registry = server.service.metrics_registry
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)


async def check_replica_affinity(first: GrpcServer, second: GrpcServer) -> None:
    """Two workhorse replicas (one engine each): per session, its first turn's prompt on the
    replica the directory ranks first for it, then its next turn's prompt on that replica and,
    as the round-robin baseline, on the other one. Cached prompt tokens, not times."""
    pool = [first.address, second.address]
    directory = LaneDirectory(
        TopologySettings(lanes={"workhorse": pool}), grpc.aio.insecure_channel
    )
    affine = baseline = 0
    try:
        assert await directory.refresh() == []
        for session in (1, 2):
            key = affinity_key(f"session-{session}", "workhorse")
            home, other = [e.address for e in directory.candidates("workhorse", key)]
            await cached_tokens(home, conversation(session, 6))
            # The session's replica is the same on its next turn.
            assert directory.candidates("workhorse", key)[0].address == home
            affine += await cached_tokens(home, conversation(session, 7))
            baseline += await cached_tokens(other, conversation(session, 7))
    finally:
        await directory.close()
    print(f"cached_prompt_tokens, next turn: affinity {affine}, round-robin {baseline}")
    # A session's next prompt (~490 tokens) shares ~417 with its last one and ~24 (the system
    # prompt) with any other session's: most of it is cached on its own replica only.
    assert affine >= baseline + 2 * 300, (affine, baseline)
    # The real engines' own stat loggers saw the same hits (the model-server metrics an
    # inference scheduler reads), and their prompt lookups.
    hits = sum(engine_sample(s, "vllm:prefix_cache_hits_total") for s in (first, second))
    queries = sum(engine_sample(s, "vllm:prefix_cache_queries_total") for s in (first, second))
    assert hits >= affine + baseline and queries > hits, (hits, queries)


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.usefixtures("without_shared_engine")
async def test_escalation_crosses_processes(tmp_path: Path) -> None:
    tools_server, tools = await start_fake("tools")
    # The second process hosts workhorse too: a second replica of it on the same engine.
    first, second = inference(["workhorse"]), inference(["workhorse", "planner", "heavy"])
    servers: list[GrpcServer] = [tools_server, first, second]
    try:
        await first.start()
        await second.start()
        await first.wait_until_serving(900)
        await second.wait_until_serving(900)
        values: dict[str, Any] = {
            "port": 0,
            "metrics_port": 0,
            "grace_seconds": 1.0,
            "tools": {"target": tools_server.address},
            "session_store_url": f"sqlite+aiosqlite:///{tmp_path / 's.sqlite'}",
            "caps": Caps(turn_budget_s=600, task_budget_s=1200, max_rounds_per_turn=1),
            "dependency_wait_s": 60,
            "topology": {
                "lanes": {
                    "workhorse": [first.address],
                    "planner": [second.address],
                    "heavy": [second.address],
                }
            },
            "profile": {
                "required_first_round_tools": ["kb_search"],
                "plan_max_tokens": 48,
                "compose_max_tokens": 16,
                "compose_reserve_s": 60,
                "lane_overrides": {"workhorse": {"tool_call_max_tokens": 4}},
                "tool_call_max_tokens": 200,
            },
        }
        settings = OrchestratorSettings(**values)
        service = OrchestratorService(settings)
        orchestrator = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
        servers.insert(0, orchestrator)
        await orchestrator.start()
        await orchestrator.wait_until_serving(120)
        async with grpc.aio.insecure_channel(orchestrator.address) as channel:
            stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
            # Anonymous: kb_search is the only tool, its query the only argument.
            session = (await stub.CreateSession(pb.CreateSessionRequest())).session
            request = pb.RunTurnRequest(
                session_id=session.session_id, user_message="How do I get a refund?"
            )
            events = [e async for e in stub.RunTurn(request, timeout=900)]
        escalations = [e.escalation for e in events if e.HasField("escalation")]
        assert [(x.kind, x.from_lane, x.to_lane) for x in escalations] == [
            (pb.Escalation.KIND_REPROMPT_WITH_SCHEMA, "workhorse", "workhorse"),
            (pb.Escalation.KIND_LANE_ESCALATION, "workhorse", "planner"),
        ]
        finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
        assert [(f.name, f.status) for f in finished] == [("kb_search", "OK")], [
            f.error_message for f in finished
        ]
        (done,) = [e.turn_completed for e in events if e.HasField("turn_completed")]
        lanes = {u.lane for u in done.usage}
        assert "planner" in lanes and "workhorse" in lanes
        assert tools.of_tool("kb_search")
        # The workhorse pool above is the first process alone: the escalated call went to the
        # second because only it hosts planner, never as a workhorse replica.
        await check_replica_affinity(first, second)
    finally:
        for server in servers:
            await server.stop(grace=1)
