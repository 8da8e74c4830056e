"""The real three services in one process (the inference service on a scripted fake engine,
the tool service on SQLite demo data, the orchestrator), one Telemetry with an in-memory
span exporter: one trace per turn with the GenAI spans, stage spans adding up to the turn;
then the /metrics endpoints: moving after a turn and `promtool check metrics` clean."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest_asyncio
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from services.inference.config import InferenceSettings
from services.inference.service import InferenceService
from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.loop.policy import AgentProfile, Caps
from services.orchestrator.service import OrchestratorService
from services.tools.backends import open_backends
from services.tools.config import ToolsSettings
from services.tools.demo_data import build_demo_dataset
from services.tools.service import ToolsService
from shared import semconv as sc
from shared.config import ClientSettings
from shared.server import GrpcServer
from shared.telemetry import Telemetry
from tests.inference.fakes import FakeEngineFactory
from tests.scripted_turn import script
from tests.tools.fakes import HashEmbedder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mesh:
    exporter: InMemorySpanExporter
    stub: orchestrator_pb2_grpc.AgentServiceStub
    metrics_ports: dict[str, int]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(tmp_path_factory: object) -> AsyncIterator[Mesh]:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="obs-mesh-"))
    exporter = InMemorySpanExporter()
    telemetry = Telemetry.with_exporter(exporter, "mesh")
    ports = {name: free_port() for name in ("inference", "tools", "orchestrator")}

    inf_settings = InferenceSettings(port=0, metrics_port=ports["inference"], grace_seconds=1)
    lanes = inf_settings.load_lanes()
    for spec in lanes.lanes.values():  # the fake engine's tokens are characters
        spec.engine_args["max_model_len"] = 65536
    inference = GrpcServer(
        InferenceService(
            inf_settings,
            lanes,
            engine_factory=FakeEngineFactory(script=script),
            telemetry=telemetry,
        ),
        inf_settings,
    )
    tools_settings = ToolsSettings(port=0, metrics_port=ports["tools"], data_dir=folder)
    backends = await open_backends(
        tools_settings, embedder=HashEmbedder(), dataset=build_demo_dataset()
    )
    tools = GrpcServer(
        ToolsService(tools_settings, backends=backends, telemetry=telemetry), tools_settings
    )
    servers = [inference, tools]
    for server in servers:
        await server.start()
    for server in servers:
        await server.wait_until_serving(60)
    orch_settings = OrchestratorSettings(
        port=0,
        metrics_port=ports["orchestrator"],
        inference=ClientSettings(target=inference.address),
        tools=ClientSettings(target=tools.address),
        session_store_url=f"sqlite+aiosqlite:///{folder / 'sessions.sqlite'}",
        profile=AgentProfile(tool_selection="plan", compose_reserve_s=0.5),
        caps=Caps(turn_budget_s=60, task_budget_s=600),
    )
    orchestrator = GrpcServer(
        OrchestratorService(orch_settings, telemetry=telemetry), orch_settings
    )
    await orchestrator.start()
    await orchestrator.wait_until_serving(60)
    servers.append(orchestrator)
    channel = grpc.aio.insecure_channel(orchestrator.address)
    try:
        yield Mesh(exporter, orchestrator_pb2_grpc.AgentServiceStub(channel), ports)
    finally:
        await channel.close()
        for server in reversed(servers):
            await server.stop(grace=1)
        await backends.close()
        shutil.rmtree(folder, ignore_errors=True)


async def _turn(mesh: Mesh, message: str) -> tuple[str, pb.TurnCompleted]:
    created = await mesh.stub.CreateSession(
        pb.CreateSessionRequest(customer_id="CUST-0001"), timeout=10
    )
    sid = created.session.session_id
    done = None
    async for reply in mesh.stub.RunTurn(
        pb.RunTurnRequest(session_id=sid, user_message=message), timeout=30
    ):
        if reply.HasField("turn_completed"):
            done = reply.turn_completed
    assert done is not None
    return sid, done


def _duration(span: ReadableSpan) -> float:
    assert span.start_time is not None and span.end_time is not None
    return (span.end_time - span.start_time) / 1e9


async def test_one_turn_is_one_trace_with_the_genai_spans(mesh: Mesh) -> None:
    mesh.exporter.clear()
    sid, done = await _turn(mesh, "I was charged twice, my card is 4111 1111 1111 1111.")
    assert done.answer.startswith("Your June invoice was paid twice")
    spans = mesh.exporter.get_finished_spans()
    (agent,) = [s for s in spans if s.name == sc.agent_span()]
    trace_id = agent.context.trace_id
    turn_spans = [s for s in spans if s.context.trace_id == trace_id]
    # Every span of the turn, in all three services, is in the agent's trace.
    names = [s.name for s in turn_spans]
    assert "/agentmesh.orchestrator.v1.AgentService/RunTurn" in names
    # Each downstream RPC: the orchestrator's client span and the service's server span.
    for rpc in (
        "agentmesh.inference.v1.InferenceService/Generate",
        "agentmesh.inference.v1.InferenceService/CallTools",
        "agentmesh.inference.v1.InferenceService/StreamGenerate",
        "agentmesh.inference.v1.InferenceService/CountTokens",
        "agentmesh.tools.v1.ToolService/ExecuteTools",
    ):
        kinds = {s.kind.name for s in turn_spans if s.name == f"/{rpc}"}
        assert kinds == {"CLIENT", "SERVER"}, rpc

    a = agent.attributes or {}
    assert a[sc.GEN_AI_OPERATION_NAME] == "invoke_agent"
    assert a[sc.GEN_AI_CONVERSATION_ID] == sid
    assert a[sc.AM_TURN_OUTCOME] == "completed"
    assert a[sc.AM_TOOL_CALLS] == 2
    assert a[sc.GEN_AI_USAGE_INPUT_TOKENS] > 0

    chats = [s for s in turn_spans if (s.attributes or {}).get(sc.GEN_AI_OPERATION_NAME) == "chat"]
    assert sorted(c.attributes[sc.AM_STAGE] for c in chats) == ["compose", "plan", "tool_emit"]
    for chat in chats:
        c = chat.attributes or {}
        assert chat.name == f"chat {c[sc.GEN_AI_REQUEST_MODEL]}"
        assert c[sc.GEN_AI_PROVIDER_NAME] == "vllm"
        assert c[sc.GEN_AI_USAGE_INPUT_TOKENS] > 0 and c[sc.GEN_AI_USAGE_OUTPUT_TOKENS] > 0
        assert sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS in c
        if c[sc.AM_STAGE] != "tool_emit":  # CallTools reports no single finish reason
            assert c[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
        assert c[sc.AM_LANE]
    (emit,) = [c for c in chats if c.attributes[sc.AM_STAGE] == "tool_emit"]
    assert emit.attributes[sc.AM_PARSE_OUTCOME] == "ok"
    assert emit.attributes[sc.AM_ESCALATION_LEVEL] == 0
    (compose,) = [c for c in chats if c.attributes[sc.AM_STAGE] == "compose"]
    assert compose.attributes[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] > 0

    tools = [s for s in turn_spans if s.name.startswith("execute_tool ")]
    assert sorted(s.attributes[sc.GEN_AI_TOOL_NAME] for s in tools) == [
        "billing_lookup",
        "kb_search",
    ]
    for span in tools:
        assert span.attributes[sc.GEN_AI_TOOL_CALL_ID].startswith("call_1_1_")
        assert span.attributes[sc.GEN_AI_TOOL_TYPE] == "function"
        assert span.name == f"execute_tool {span.attributes[sc.GEN_AI_TOOL_NAME]}"

    # Stage spans: children of the turn, never overlapping, adding up to the turn less what
    # lies between stages (bounded by the turn's measured network share).
    stages = sorted(
        (s for s in turn_spans if s.name.startswith(sc.STAGE_SPAN_PREFIX)),
        key=lambda s: s.start_time or 0,
    )
    assert [s.attributes[sc.AM_STAGE] for s in stages] == [
        "context",
        "plan",
        "tool_emit",
        "tool_wall",
        "observe",
        "compose",
    ]
    assert all(s.parent is not None and s.parent.span_id == agent.context.span_id for s in stages)
    for before, after in itertools.pairwise(stages):
        assert (before.end_time or 0) <= (after.start_time or 0)
    assert (agent.start_time or 0) <= (stages[0].start_time or 0)
    assert (stages[-1].end_time or 0) <= (agent.end_time or 0)
    total = _duration(agent)
    covered = sum(_duration(s) for s in stages)
    network = done.latency.network.seconds + done.latency.network.nanos / 1e9
    assert covered <= total
    assert total - covered <= max(network, 0.0) + 0.25 * total
    # Message content is not captured by default, and nothing exported carries the card.
    assert sc.GEN_AI_INPUT_MESSAGES not in a
    exported = json.dumps([dict(s.attributes or {}) for s in spans], default=str)
    assert "4111" not in exported


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body: bytes = reply.read()
    return body.decode()


def _value(text: str, sample: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_metrics_move_after_a_turn_and_promtool_checks_them(mesh: Mesh) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install -y prometheus (see .ci/run)"
    before = {name: _scrape(port) for name, port in mesh.metrics_ports.items()}
    await _turn(mesh, "Why was I charged twice?")
    after = {name: _scrape(port) for name, port in mesh.metrics_ports.items()}
    moving = [
        ("orchestrator", "agentmesh_turns_total", {"outcome": "completed"}),
        ("orchestrator", "agentmesh_turn_seconds_count", {}),
        ("orchestrator", "agentmesh_turn_stage_seconds_count", {"stage": "plan"}),
        ("orchestrator", "agentmesh_turn_tokens_total", {"kind": "prompt"}),
        ("orchestrator", "agentmesh_turn_tool_calls_total", {"tool": "kb_search"}),
        ("inference", "agentmesh_inference_ttft_seconds_count", {}),
        ("inference", "agentmesh_inference_inter_token_latency_seconds_count", {}),
        ("inference", "agentmesh_inference_tokens_total", {"kind": "completion"}),
        ("inference", "agentmesh_inference_tool_calls_total", {"outcome": "ok"}),
        ("tools", "agentmesh_tool_calls_total", {"tool": "billing_lookup", "status": "ok"}),
        ("tools", "agentmesh_tool_call_latency_seconds_count", {"tool": "kb_search"}),
        ("tools", "agentmesh_rpc_requests_total", {"method": "ExecuteTools", "code": "OK"}),
    ]
    for service, sample, labels in moving:
        assert _value(after[service], sample, **labels) > _value(
            before[service], sample, **labels
        ), (
            service,
            sample,
        )
    # The turn's new session joins the active ones (the window, 300 s, outlives this module).
    active = "agentmesh_active_sessions"
    assert _value(after["orchestrator"], active) == _value(before["orchestrator"], active) + 1
    assert _value(after["orchestrator"], "agentmesh_turns_in_flight") == 0
    for service, text in after.items():
        proc = await asyncio.create_subprocess_exec(
            promtool,
            "check",
            "metrics",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(text.encode())
        assert proc.returncode == 0, (service, out.decode(), err.decode())
