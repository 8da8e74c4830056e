"""Two REAL inference processes hosting different lanes behind one orchestrator: workhorse in
one, planner and heavy in the other (one engine each, the embedded SmolLM2). The workhorse's
tool calls are cut to 4 tokens (a per-lane override), so under any model output they fail
validation; the re-prompt fails the same way; the escalation to planner goes to the other
process, whose calls (200 tokens, grammar-constrained: a 200-character query fits) are
valid. The events record it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.inference.config import InferenceSettings
from services.inference.service import InferenceService
from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.loop.policy import Caps
from services.orchestrator.service import OrchestratorService
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


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.usefixtures("without_shared_engine")
async def test_escalation_crosses_processes(tmp_path: Path) -> None:
    tools_server, tools = await start_fake("tools")
    first, second = inference(["workhorse"]), inference(["planner", "heavy"])
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
    finally:
        for server in servers:
            await server.stop(grace=1)
