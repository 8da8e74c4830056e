"""The whole agent in one process (services/orchestrator/inprocess.py) against the mesh: the
same turn over the same scripted model gives the same events whether the loop reaches the
inference and tools services over gRPC or calls their cores in this process; and the tools
service binds the principal the same way on both paths.

Each path gets its own real inference service (over the scripted fake engine) and real tool
service (SQLite demo data, hashed embeddings), built from the same settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.inference.config import InferenceSettings
from services.inference.service import InferenceService
from services.orchestrator.clients import GrpcInference, GrpcTools
from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.inprocess import InProcessBackends
from services.orchestrator.loop.events import (
    Latency,
    ToolCallFinished,
    TurnCompleted,
    TurnEvent,
)
from services.orchestrator.loop.policy import AgentProfile, Caps
from services.orchestrator.loop.ports import InferencePort, ToolsPort
from services.orchestrator.loop.types import (
    ComposeDelta,
    ComposeDone,
    LaneRequest,
    Message,
    Principal,
    Role,
    ToolInvocation,
    ToolOutcome,
)
from services.orchestrator.service import OrchestratorService, build_agent
from services.orchestrator.sessions.sql import SqlSessionStore
from services.tools.config import ToolsSettings
from services.tools.service import ToolsService
from shared.config import ClientSettings
from shared.errors import DeadlineExceeded, InvalidArgument
from shared.server import GrpcServer
from shared.telemetry import Telemetry
from tests.inference.fakes import FakeEngineFactory
from tests.scripted_turn import ANSWER, PLAN, script
from tests.tools.fakes import HashEmbedder

MESSAGE = "I think I was charged twice on my last invoice."


def services(
    folder: Path, *, max_concurrency: int | None = None, **engine: Any
) -> tuple[InferenceService, ToolsService]:
    """The inference service on the scripted engine (``engine``: more of the fake engine's
    fields; ``max_concurrency``: every lane's cap), the tool service on seeded SQLite."""
    inference_settings = InferenceSettings(port=0, metrics_port=0, grace_seconds=1)
    lanes = inference_settings.load_lanes()
    for spec in lanes.lanes.values():  # the fake engine's tokens are characters
        spec.engine_args["max_model_len"] = 65536
        if max_concurrency is not None:
            spec.max_concurrency = max_concurrency
    inference = InferenceService(
        inference_settings, lanes, engine_factory=FakeEngineFactory(script=script, **engine)
    )
    tools_settings = ToolsSettings(port=0, metrics_port=0, data_dir=folder, grace_seconds=1)
    return inference, ToolsService(tools_settings, embedder=HashEmbedder())


def orchestrator_settings(folder: Path, **overrides: Any) -> OrchestratorSettings:
    return OrchestratorSettings(
        port=0,
        metrics_port=0,
        grace_seconds=1,
        session_store_url=f"sqlite+aiosqlite:///{folder / 'sessions.sqlite'}",
        profile=AgentProfile(tool_selection="plan", compose_reserve_s=0.5),
        caps=Caps(turn_budget_s=60, task_budget_s=600),
        **overrides,
    )


@dataclass
class Ports:
    inference: InferencePort
    tools: ToolsPort


@asynccontextmanager
async def grpc_ports(folder: Path) -> AsyncIterator[Ports]:
    """Both services behind their own gRPC servers; the loop's gRPC adapters."""
    inference, tools = services(folder)
    servers = [GrpcServer(inference, inference.settings), GrpcServer(tools, tools.settings)]
    for server in servers:
        await server.start()
    channels: list[grpc.aio.Channel] = []
    try:
        for server in servers:
            await server.wait_until_serving(30)
            channels.append(grpc.aio.insecure_channel(server.address))
        yield Ports(GrpcInference(channels[0]), GrpcTools(channels[1]))
    finally:
        for channel in channels:
            await channel.close()
        for server in reversed(servers):
            await server.stop(grace=1)


@asynccontextmanager
async def local_ports(folder: Path) -> AsyncIterator[Ports]:
    """Both services in this process, no server: the in-process adapters."""
    backends = InProcessBackends(*services(folder))
    await backends.start()
    try:
        yield Ports(backends.inference, backends.tools)
    finally:
        await backends.close()


def comparable(event: TurnEvent) -> TurnEvent:
    """The event without what is timed (latencies)."""
    if isinstance(event, ToolCallFinished):
        return dataclasses.replace(event, latency_s=0.0)
    if isinstance(event, TurnCompleted):
        return dataclasses.replace(event, latency=Latency())
    return event


async def one_turn(ports: Ports, folder: Path) -> list[TurnEvent]:
    """A session for CUST-0001 and one turn through Agent.run_turn (RunTurn's entrypoint)."""
    settings = orchestrator_settings(folder)
    store = SqlSessionStore(settings.resolved_store_url())
    await store.open()
    try:
        agent = build_agent(
            settings,
            store,
            ports.inference,
            ports.tools,
            Telemetry.from_settings(settings.telemetry, "orchestrator"),
        )
        await agent.create_session(customer_id="CUST-0001", session_id="s1")
        async with aclosing(agent.run_turn("s1", MESSAGE)) as events:
            return [comparable(e) async for e in events]
    finally:
        await store.close()


async def test_one_turn_gives_the_same_events_in_process_as_over_grpc(tmp_path: Path) -> None:
    async with grpc_ports(tmp_path / "mesh") as ports:
        over_grpc = await one_turn(ports, tmp_path / "mesh")
    async with local_ports(tmp_path / "local") as ports:
        in_process = await one_turn(ports, tmp_path / "local")

    assert in_process == over_grpc
    done = over_grpc[-1]
    assert isinstance(done, TurnCompleted)
    assert done.answer == ANSWER
    assert done.tool_calls == 2
    finished = [e for e in over_grpc if isinstance(e, ToolCallFinished)]
    assert sorted((e.name, e.status) for e in finished) == [
        ("billing_lookup", "OK"),
        ("kb_search", "OK"),
    ]


def outcome_fields(outcomes: Sequence[ToolOutcome]) -> list[tuple[str, str, str, str]]:
    return [(o.call_id, o.status, o.error_message, o.result_json) for o in outcomes]


async def test_the_tool_service_binds_the_principal_the_same_way_in_process(
    tmp_path: Path,
) -> None:
    """A call for the session's own customer runs with the customer filled in; one naming
    another customer is NOT_FOUND; an anonymous principal may not use a customer tool."""
    invocations = [
        ToolInvocation("own", "crm_lookup", "{}", timeout_ms=5000),
        ToolInvocation("other", "crm_lookup", '{"customer_id": "CUST-0002"}', timeout_ms=5000),
    ]
    results: dict[str, dict[str, list[tuple[str, str, str, str]]]] = {}
    for name, ports_of in (("grpc", grpc_ports), ("local", local_ports)):
        async with ports_of(tmp_path / name) as ports:
            results[name] = {
                who: outcome_fields(
                    await ports.tools.execute(
                        invocations, principal=Principal(customer), timeout_s=10
                    )
                )
                for who, customer in (("customer", "CUST-0001"), ("anonymous", ""))
            }
            with pytest.raises(InvalidArgument):
                await ports.tools.execute(
                    invocations, principal=Principal("not a customer id"), timeout_s=10
                )

    assert results["local"] == results["grpc"]
    customer = results["local"]["customer"]
    assert [(call, status) for call, status, _, _ in customer] == [
        ("own", "OK"),
        ("other", "NOT_FOUND"),
    ]
    assert json.loads(customer[0][3])["customer"]["customer_id"] == "CUST-0001"
    assert [status for _, status, _, _ in results["local"]["anonymous"]] == [
        "PERMISSION_DENIED",
        "PERMISSION_DENIED",
    ]


async def test_the_orchestrator_serves_run_turn_over_in_process_backends(tmp_path: Path) -> None:
    """OrchestratorService(backends=...): the one-process agent behind AgentService, started
    and stopped by the shared server bootstrap."""
    settings = orchestrator_settings(
        tmp_path,
        inference=ClientSettings(target="127.0.0.1:1"),  # never dialled
        tools=ClientSettings(target="127.0.0.1:1"),
    )
    backends = InProcessBackends(*services(tmp_path))
    server = GrpcServer(OrchestratorService(settings, backends=backends), settings)
    await server.start()
    try:
        await server.wait_until_serving(30)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
            created = await stub.CreateSession(
                pb.CreateSessionRequest(customer_id="CUST-0001"), timeout=10
            )
            kinds = []
            done = None
            async for reply in stub.RunTurn(
                pb.RunTurnRequest(session_id=created.session.session_id, user_message=MESSAGE),
                timeout=30,
            ):
                kinds.append(reply.WhichOneof("event"))
                if reply.HasField("turn_completed"):
                    done = reply.turn_completed
    finally:
        await server.stop(grace=1)

    assert done is not None
    assert done.answer == ANSWER
    assert done.outcome == pb.TURN_OUTCOME_COMPLETED
    assert kinds[0] == "turn_started" and kinds[-1] == "turn_completed"
    assert kinds.count("tool_call_finished") == 2
    assert backends.inference_service.core.engines["engine-0"].started is False  # closed


LANE = LaneRequest(stage="compose", lane="workhorse")
ASK = [Message(Role.USER, MESSAGE)]


def refusals(backends: InProcessBackends, lane: str) -> float:
    """How many calls the inference core refused on ``lane`` (a full lane)."""
    counter = backends.inference_service.core.metrics.rejected.labels(lane)
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


async def test_in_process_a_call_a_full_lane_refused_is_retried_on_its_hint(
    tmp_path: Path,
) -> None:
    """The lane's one slot held by a stream: a plan is refused, waits the hint and, the
    stream done, is served on its retry (as the gRPC adapter retries RESOURCE_EXHAUSTED)."""
    hold = asyncio.Event()
    backends = InProcessBackends(*services(tmp_path, max_concurrency=1, hold_after_first=hold))
    await backends.start()
    try:
        inference = backends.inference
        answer = inference.answer(
            ASK, [], LANE, tool_choice="none", max_calls=0, max_tokens=512, timeout_s=30
        )
        async with aclosing(answer) as stream:
            first = await anext(stream)  # the stream holds the lane's one slot
            plan = asyncio.create_task(
                inference.plan(
                    ASK, [], LANE, json_schema='{"type": "object"}', max_tokens=512, timeout_s=30
                )
            )
            for _ in range(10_000):  # until the plan's first attempt was refused
                if refusals(backends, "workhorse") or plan.done():
                    break
                await asyncio.sleep(0)
            refused_while_held = refusals(backends, "workhorse")
            hold.set()
            rest = [item async for item in stream]
        planned = await plan
    finally:
        await backends.close()

    assert refused_while_held == 1
    assert refusals(backends, "workhorse") == 1  # the retry was served
    assert isinstance(first, ComposeDelta)
    assert isinstance(rest[-1], ComposeDone)
    assert json.loads(planned.text) == PLAN


async def test_in_process_a_stream_past_its_deadline_is_deadline_exceeded_and_aborted(
    tmp_path: Path,
) -> None:
    hold = asyncio.Event()  # never set: the generation stalls after its first delta
    backends = InProcessBackends(*services(tmp_path, hold_after_first=hold))
    await backends.start()
    try:
        answer = backends.inference.answer(
            ASK, [], LANE, tool_choice="none", max_calls=0, max_tokens=512, timeout_s=0.5
        )
        async with aclosing(answer) as stream:
            first = await anext(stream)
            with pytest.raises(DeadlineExceeded):
                await anext(stream)
        engine = backends.inference_service.core.engines["engine-0"]
        aborted, live = list(engine.aborted), set(engine.live)
    finally:
        await backends.close()

    assert isinstance(first, ComposeDelta)
    assert len(aborted) == 1
    assert live == set()
