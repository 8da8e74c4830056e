"""AgentService through a real gRPC server on port 0, over real channels to fake downstream
inference and tools servers: events, persistence, statuses, leases, replicas, disconnects."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc
from google.protobuf import duration_pb2

from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.loop.context import CUT_MARKER
from services.orchestrator.loop.policy import Caps
from services.orchestrator.service import OrchestratorService
from services.orchestrator.sessions.factory import store_from_url
from services.orchestrator.sessions.redis_store import RedisSessionStore
from services.orchestrator.sessions.sql import SqlSessionStore
from shared.server import GrpcServer
from tests.orchestrator.conftest import POSTGRES_URL, REDIS_URL, unique_prefix
from tests.orchestrator.grpc_fakes import (
    READS,
    FakeInferenceServicer,
    FakeToolServicer,
    start_fake,
)


@dataclass
class Mesh:
    inference: FakeInferenceServicer
    tools: FakeToolServicer
    inference_address: str
    tools_address: str
    store_url: str
    store_prefix: str
    servers: list[GrpcServer]

    def settings(self, **overrides: Any) -> OrchestratorSettings:
        values: dict[str, Any] = {
            "port": 0,
            "metrics_port": 0,
            "grace_seconds": 1.0,
            "inference": {"target": self.inference_address},
            "tools": {"target": self.tools_address},
            "session_store_url": self.store_url,
            "session_store_prefix": self.store_prefix,
            "caps": Caps(turn_budget_s=20, task_budget_s=200),
            "dependency_wait_s": 10,
        }
        values.update(overrides)
        return OrchestratorSettings(**values)

    async def orchestrator(self, **overrides: Any) -> GrpcServer:
        settings = self.settings(**overrides)
        service = OrchestratorService(settings)
        server = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
        await server.start()
        await server.wait_until_serving(20)
        self.servers.append(server)
        return server


STORE_KINDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("redis", marks=pytest.mark.redis),
]
# Store-independent tests that start subprocesses stay on SQLite (wall time).
SQLITE_ONLY = pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)


def _store_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'sessions.sqlite'}"
    return POSTGRES_URL if kind == "postgres" else REDIS_URL


async def _drop_store(url: str, prefix: str) -> None:
    """Removes what the orchestrators wrote under ``prefix`` on a shared server."""
    if url.startswith("sqlite"):
        return
    store = store_from_url(url, prefix=prefix)
    await store.open()
    try:
        if isinstance(store, SqlSessionStore):
            await store.drop_tables()
        elif isinstance(store, RedisSessionStore):
            await store.drop_keys()
    finally:
        await store.close()


@pytest.fixture(params=STORE_KINDS)
async def mesh(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Mesh]:
    inference_server, inference = await start_fake("inference")
    tools_server, tools = await start_fake("tools")
    url = _store_url(request.param, tmp_path)
    m = Mesh(
        inference,
        tools,
        inference_server.address,
        tools_server.address,
        url,
        unique_prefix(),
        [],
    )
    try:
        yield m
    finally:
        for server in [*m.servers, inference_server, tools_server]:
            await server.stop(grace=0.5)
        await _drop_store(url, m.store_prefix)


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[orchestrator_pb2_grpc.AgentServiceStub]:
    server = await mesh.orchestrator()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield orchestrator_pb2_grpc.AgentServiceStub(channel)


async def create(stub: Any, **kw: Any) -> pb.Session:
    response = await stub.CreateSession(pb.CreateSessionRequest(customer_id="CUST-0042", **kw))
    return response.session  # type: ignore[no-any-return]


async def turn(
    stub: Any, session_id: str, text: str, *, timeout: float | None = None, **kw: Any
) -> list[pb.RunTurnResponse]:
    request = pb.RunTurnRequest(session_id=session_id, user_message=text, **kw)
    return [r async for r in stub.RunTurn(request, timeout=timeout)]


def _of(events: list[pb.RunTurnResponse], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.HasField(kind)]


def _offered(mesh: Mesh, kind: str) -> list[Any]:
    """The tools the last request of ``kind`` offered the model."""
    return list(mesh.inference.of_kind(kind)[-1].tools)


def kinds(events: list[pb.RunTurnResponse]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


async def test_create_get_end_session(stub: Any) -> None:
    budget = pb.Budget(max_tool_calls_per_task=7)
    budget.turn_budget.FromSeconds(9)
    session = await create(stub, budget=budget, metadata={"channel": "web"})
    assert session.state == pb.SESSION_STATE_ACTIVE
    assert session.budget.max_tool_calls_per_task == 7
    assert session.budget.turn_budget.seconds == 9
    assert session.budget.max_tool_calls_per_turn == 5  # zero took the default
    assert session.budget.task_budget.seconds == 200
    got = (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).session
    assert got.customer_id == "CUST-0042" and got.metadata["channel"] == "web"
    ended = await stub.EndSession(pb.EndSessionRequest(session_id=session.session_id))
    assert ended.session.state == pb.SESSION_STATE_ENDED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await turn(stub, session.session_id, "hello again")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_run_turn_streams_every_stage_and_persists_the_turn(stub: Any, mesh: Mesh) -> None:
    session = await create(stub)
    events = await turn(stub, session.session_id, "Why was I charged twice?")
    names = kinds(events)
    assert names[0] == "turn_started" and names[-1] == "turn_completed"
    assert names[1] == "plan"
    assert names.count("tool_call_started") == 3 and names.count("tool_call_finished") == 3
    assert names.count("compose_delta") > 1
    assert names.index("tool_call_finished") < names.index("compose_delta")
    plan = events[1].plan
    assert list(plan.chosen_tools) == READS and plan.lane == "workhorse" and plan.round == 1
    assert [(c.tool, c.intent) for c in plan.calls] == [(n, f"look up {n}") for n in READS]
    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    assert {f.status for f in finished} == {"OK"} and {f.round for f in finished} == {1}
    done = events[-1].turn_completed
    deltas = "".join(e.compose_delta.text for e in events if e.HasField("compose_delta"))
    assert done.answer == deltas == mesh.inference.answer
    assert done.outcome == pb.TURN_OUTCOME_COMPLETED
    assert done.tool_calls == 3 and done.task_tool_calls == 3
    # plan -> one batched emission -> continue-or-answer (which answered in text).
    assert done.llm_stages == 3
    usage = {u.lane: u for u in done.usage}
    assert usage["workhorse"].usage.cached_prompt_tokens == 250  # one plan
    assert usage["workhorse"].generations == 1 + 4 + 1
    latency = done.latency
    for stage in ("plan", "tool_emit", "tool_wall", "compose", "queue_prefill", "total"):
        assert getattr(latency, stage).ToNanoseconds() > 0, stage
    # Engine-reported time to first token: plan 5 ms + answer 7 ms.
    assert latency.queue_prefill.ToMilliseconds() == 12
    assert [i.name for i in mesh.tools.invocations] == READS
    # Fit the context, plan, emit, count the observations, continue-or-answer.
    assert mesh.inference.kinds() == [
        "count_tokens",
        "plan",
        "call_tools",
        "count_tokens",
        "answer",
    ]
    fit = mesh.inference.of_kind("count_tokens")[0]
    assert fit.messages[-1].content == "Why was I charged twice?" and len(fit.tools) == 5
    emit = mesh.inference.of_kind("call_tools")[0]
    assert emit.parallel and emit.tool_choice.mode == inference_pb2.ToolChoice.MODE_NAMED
    assert list(emit.tool_choice.names) == READS
    answer = mesh.inference.of_kind("answer")[0]
    assert answer.tool_choice.mode == inference_pb2.ToolChoice.MODE_AUTO and answer.max_calls == 2

    stored = (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).session
    roles = [m.role for m in stored.messages]
    assert roles == [
        common_pb2.ROLE_USER,
        common_pb2.ROLE_ASSISTANT,
        common_pb2.ROLE_TOOL,
        common_pb2.ROLE_TOOL,
        common_pb2.ROLE_TOOL,
        common_pb2.ROLE_ASSISTANT,
    ]
    assert all('trust="untrusted-data"' in m.content for m in stored.messages[2:5])
    assert stored.messages[-1].content == done.answer
    assert stored.turn_count == 1 and stored.task_tool_calls == 3
    assert stored.task_time_used.ToNanoseconds() > 0

    # The second turn sees the first in its prompt (its answer; old tool traffic is dropped).
    await turn(stub, session.session_id, "And what about last month?")
    compose_prompt = mesh.inference.of_kind("answer")[-1]
    contents = [m.content for m in compose_prompt.messages]
    assert "Why was I charged twice?" in contents and mesh.inference.answer in contents


async def test_principal_arguments_are_filled_from_the_session_not_the_model(
    stub: Any, mesh: Mesh
) -> None:
    """The model never sees customer_id in a schema, and what it writes there is replaced."""
    mesh.inference.arguments["crm_lookup"] = {"customer_id": "CUST-9999"}
    mesh.inference.arguments["billing_lookup"] = {"customer_id": "CUST-9999"}
    session = await create(stub)
    events = await turn(stub, session.session_id, "Who am I?")
    assert events[-1].turn_completed.outcome == pb.TURN_OUTCOME_COMPLETED
    offered = {t.name: json.loads(t.parameters_json_schema) for t in _offered(mesh, "call_tools")}
    for name in ("crm_lookup", "billing_lookup"):
        assert "customer_id" not in offered[name]["properties"]
        assert "customer_id" not in offered[name].get("required", [])
    for executed in mesh.tools.of_tool("crm_lookup") + mesh.tools.of_tool("billing_lookup"):
        assert executed.args["customer_id"] == "CUST-0042"
    started = [e.tool_call_started for e in events if e.HasField("tool_call_started")]
    assert all("CUST-9999" not in s.arguments_json for s in started)
    assert mesh.tools.principals == ["customer:CUST-0042"]


async def test_an_anonymous_session_is_offered_the_knowledge_base_only(
    stub: Any, mesh: Mesh
) -> None:
    mesh.inference.answer_calls = [[("crm_lookup", {"customer_id": "CUST-0042"})]]
    session = (await stub.CreateSession(pb.CreateSessionRequest())).session
    events = await turn(stub, session.session_id, "How do refunds work?")
    done = events[-1].turn_completed
    assert done.outcome == pb.TURN_OUTCOME_COMPLETED
    for kind in ("plan", "call_tools", "answer"):
        assert {t.name for t in _offered(mesh, kind)} == {"kb_search"}, kind
    plan_schema = json.loads(mesh.inference.of_kind("plan")[0].response_format.json_schema)
    assert plan_schema["properties"]["calls"]["items"]["properties"]["tool"]["enum"] == [
        "kb_search"
    ]
    # The plan named crm_lookup and billing_lookup too, the answer stage crm_lookup: only the
    # knowledge base ran, as anonymous.
    assert [i.name for i in mesh.tools.invocations] == ["kb_search"]
    assert mesh.tools.principals == ["anonymous"]
    started = [e.tool_call_started.name for e in events if e.HasField("tool_call_started")]
    assert started == ["kb_search"]


async def test_continue_or_answer_opens_another_round_within_the_caps(
    stub: Any, mesh: Mesh
) -> None:
    mesh.inference.plan_tools = ["kb_search"]
    mesh.inference.answer_calls = [
        [("kb_search", {"query": "refund policy"})],
        [("kb_search", {"query": "never sent: no rounds left"})],
    ]
    session = await create(stub, budget=pb.Budget(max_rounds_per_turn=2))
    events = await turn(stub, session.session_id, "What is your refund policy?")
    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    assert [(f.name, f.round, f.status) for f in finished] == [
        ("kb_search", 1, "OK"),
        ("kb_search", 2, "OK"),
    ]
    assert [i.arguments_json for i in mesh.tools.invocations] == [
        json.dumps({"query": "double charge"}, separators=(",", ":")),
        json.dumps({"query": "refund policy"}, separators=(",", ":")),
    ]
    done = events[-1].turn_completed
    assert done.answer == mesh.inference.answer and done.tool_calls == 2
    # plan, emit, answer (chose a call), answer (text): four sequential LLM stages.
    assert done.llm_stages == 4
    modes = [r.HasField("tool_choice") for r in mesh.inference.of_kind("answer")]
    # The second answer had no rounds left: text only, so the fake's queued call stayed unsent.
    assert modes == [True, False]
    assert len(mesh.inference.answer_calls) == 1


async def test_a_long_message_and_a_long_tool_output_are_cut_in_lane_tokens(
    stub: Any, mesh: Mesh
) -> None:
    mesh.inference.max_model_len = 2048
    mesh.inference.plan_tools = ["kb_search"]
    mesh.tools.bodies["kb_search"] = json.dumps({"results": "x" * 20_000})
    long_message = "Please read this. " * 600  # ~2,700 fake tokens: above the whole window
    session = await create(stub)
    events = await turn(stub, session.session_id, long_message)
    done = events[-1].turn_completed
    assert "the message was cut to fit the context window" in done.notes
    plan_prompt = mesh.inference.of_kind("plan")[0].messages
    cut_user = [m.content for m in plan_prompt if m.role == common_pb2.ROLE_USER][-1]
    assert cut_user.endswith(CUT_MARKER) and len(cut_user) < len(long_message) // 2
    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    assert [(f.name, f.truncated) for f in finished] == [("kb_search", True)]
    observe = [r for r in mesh.inference.of_kind("count_tokens") if r.texts][-1]
    assert 32 <= observe.truncate_texts_to < 1000
    stored = (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).session
    assert stored.messages[0].content == long_message  # the history keeps what was said
    [tool_message] = [m.content for m in stored.messages if m.role == common_pb2.ROLE_TOOL]
    assert CUT_MARKER in tool_message and tool_message.endswith("</tool_result>")
    assert len(tool_message) < observe.truncate_texts_to * 4 + 400


async def test_a_refund_is_proposed_then_executed_once_on_confirmation(
    stub: Any, mesh: Mesh
) -> None:
    mesh.inference.plan_tools = ["billing_lookup", "billing_refund"]
    session = await create(stub)
    events = await turn(stub, session.session_id, "Please refund the duplicate charge.")
    offered = {t.name: json.loads(t.parameters_json_schema) for t in _offered(mesh, "call_tools")}
    refund_schema = offered["billing_refund"]["properties"]
    assert refund_schema["invoice_id"]["enum"] == ["INV-00012"]
    assert refund_schema["amount"]["maximum"] == 38.0  # paid twice, nothing refunded yet
    finished = {f.name: f for f in _of(events, "tool_call_finished")}
    assert finished["billing_refund"].status == "PROPOSED"
    [proposed] = _of(events, "action_proposed")
    action = proposed.action
    assert action.amount_cents == 1900 and action.currency == "USD"
    assert action.summary == "Refund 19.00 USD on INV-00012: charged twice"
    assert action.state == pb.ACTION_STATE_PENDING
    assert json.loads(action.arguments_json)["customer_id"] == "CUST-0042"
    done = events[-1].turn_completed
    assert done.outcome == pb.TURN_OUTCOME_AWAITING_CONFIRMATION
    assert action.action_id in done.answer
    assert mesh.tools.of_tool("billing_refund") == []
    # Once proposed, the answer may not open more calls.
    assert not mesh.inference.of_kind("answer")[-1].HasField("tool_choice")

    confirmed = await turn(stub, session.session_id, "", confirm_action_id=action.action_id)
    [resolved] = _of(confirmed, "action_resolved")
    assert resolved.action.state == pb.ACTION_STATE_EXECUTED
    [refund] = mesh.tools.of_tool("billing_refund")
    assert refund.invocation.idempotency_key == f"am-action-{action.action_id}"
    assert refund.principal == "customer:CUST-0042"
    assert refund.invocation.arguments_json == action.arguments_json
    assert confirmed[-1].turn_completed.outcome == pb.TURN_OUTCOME_COMPLETED

    again = await turn(stub, session.session_id, "", confirm_action_id=action.action_id)
    assert len(mesh.tools.of_tool("billing_refund")) == 1
    assert "already done" in again[-1].turn_completed.answer
    stored = (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).session
    assert [(a.action_id, a.state) for a in stored.actions] == [
        (action.action_id, pb.ACTION_STATE_EXECUTED)
    ]


@pytest.mark.parametrize(
    ("session_id", "message", "code"),
    [
        ("", "hi", grpc.StatusCode.INVALID_ARGUMENT),
        ("no-such-session", "hi", grpc.StatusCode.NOT_FOUND),
        (None, "", grpc.StatusCode.INVALID_ARGUMENT),
        (None, "   ", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_turn_requests_get_their_status(
    stub: Any, session_id: str | None, message: str, code: grpc.StatusCode
) -> None:
    if session_id is None:
        session_id = (await create(stub)).session_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await turn(stub, session_id, message)
    assert err.value.code() == code


@SQLITE_ONLY
async def test_a_turn_never_loads_the_whole_conversation(mesh: Mesh) -> None:
    server = await mesh.orchestrator()
    service = server.service
    assert isinstance(service, OrchestratorService)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        session = await create(stub)
        await turn(stub, session.session_id, "Why was I charged twice?")
        store = service.store
        loads: list[int | None] = []
        real_get = store.get

        async def get(session_id: str, *, last_messages: int | None = None) -> Any:
            loads.append(last_messages)
            return await real_get(session_id, last_messages=last_messages)

        store.get = get  # type: ignore[method-assign]
        events = await turn(stub, session.session_id, "And the second invoice?")
        assert events[-1].HasField("turn_completed")
        # The owner check and the turn's checks read no messages; the turn reads its window.
        assert loads == [0, 0, OrchestratorSettings().history_window_messages]


async def test_caller_chosen_session_id_is_used_once(stub: Any) -> None:
    session = await create(stub, session_id="demo-1")
    assert session.session_id == "demo-1"
    got = await stub.GetSession(pb.GetSessionRequest(session_id="demo-1"))
    assert got.session.customer_id == "CUST-0042"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(stub, session_id="demo-1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(stub, session_id="not valid!")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "session_id" in (err.value.details() or "")


async def test_a_customer_id_the_tools_service_cannot_bind_is_refused_at_create(
    stub: Any, mesh: Mesh
) -> None:
    """The principal's syntax is one (shared.principal_wire): a session that could never use
    a customer tool is not created."""
    for bad in ("CUST 0001", "-CUST", "x" * 65, "CUST-0001\n"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateSession(pb.CreateSessionRequest(customer_id=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("customer_id"), err.value.details()
    session = await stub.CreateSession(pb.CreateSessionRequest(customer_id="CUST-0001"))
    assert session.session.customer_id == "CUST-0001"


async def test_a_full_lane_is_retried_after_its_hint_within_the_turn(stub: Any, mesh: Mesh) -> None:
    mesh.inference.full_lane_refusals = 2
    session = await create(stub)
    events = await turn(stub, session.session_id, "Why was I charged twice?")
    done = events[-1].turn_completed
    assert done.outcome == pb.TURN_OUTCOME_COMPLETED
    assert mesh.inference.kinds().count("call_tools") == 3  # two refusals, then served
    assert done.tool_calls == 3


async def test_a_full_lane_refusing_the_answer_stream_is_retried_after_its_hint(
    stub: Any, mesh: Mesh
) -> None:
    mesh.inference.full_stream_refusals = 2
    session = await create(stub)
    events = await turn(stub, session.session_id, "Why was I charged twice?")
    done = events[-1].turn_completed
    assert done.outcome == pb.TURN_OUTCOME_COMPLETED
    assert mesh.inference.kinds().count("answer") == 3  # two refusals, then streamed
    deltas = "".join(e.compose_delta.text for e in events if e.HasField("compose_delta"))
    assert done.answer == deltas == mesh.inference.answer


async def test_unknown_session_get_and_end_are_not_found(stub: Any) -> None:
    for call in (stub.GetSession, stub.EndSession):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(pb.GetSessionRequest(session_id="missing"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_second_turn_while_one_is_in_flight_is_refused(stub: Any, mesh: Mesh) -> None:
    session = await create(stub)
    mesh.inference.compose_gate = asyncio.Event()
    first = asyncio.create_task(turn(stub, session.session_id, "first"))
    await asyncio.wait_for(mesh.inference.compose_started.wait(), 10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await turn(stub, session.session_id, "second")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    mesh.inference.compose_gate.set()
    events = await first
    assert events[-1].turn_completed.outcome == pb.TURN_OUTCOME_COMPLETED
    # The lease is released at the end of the turn.
    again = await turn(stub, session.session_id, "third")
    assert again[-1].HasField("turn_completed")


async def test_client_disconnect_cancels_the_engine_stream_and_frees_the_session(
    stub: Any, mesh: Mesh
) -> None:
    session = await create(stub)
    mesh.inference.compose_gate = asyncio.Event()  # never set: only a cancel ends it
    call = stub.RunTurn(pb.RunTurnRequest(session_id=session.session_id, user_message="hi"))
    async for event in call:
        if event.HasField("compose_delta"):
            break
    call.cancel()
    await asyncio.wait_for(mesh.inference.compose_cancelled.wait(), 10)
    # Completed steps survived; the lease was released, so the next turn runs.
    mesh.inference.compose_gate = None
    stored = (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).session
    assert stored.messages[0].content == "hi" and stored.task_tool_calls == 3
    for _ in range(50):
        try:
            events = await turn(stub, session.session_id, "still there?")
            break
        except grpc.aio.AioRpcError as err:  # the server may still be unwinding the old turn
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            await asyncio.sleep(0.1)
    assert events[-1].turn_completed.outcome == pb.TURN_OUTCOME_COMPLETED


async def test_callers_deadline_bounds_every_downstream_call(stub: Any, mesh: Mesh) -> None:
    session = await create(stub)
    await turn(stub, session.session_id, "hi", timeout=8.0)
    remaining = [t for _, _, t in mesh.inference.requests]
    assert remaining and all(t is not None and t < 8.0 for t in remaining)


async def test_turn_budget_becomes_the_downstream_deadline(stub: Any, mesh: Mesh) -> None:
    budget = pb.Budget(turn_budget=duration_pb2.Duration(seconds=6))
    session = await create(stub, budget=budget)
    await turn(stub, session.session_id, "hi")
    remaining = [t for _, _, t in mesh.inference.requests]
    assert remaining and all(t is not None and t <= 6.0 for t in remaining)


async def test_any_replica_continues_any_session_and_restarts_lose_nothing(mesh: Mesh) -> None:
    a = await mesh.orchestrator()
    b = await mesh.orchestrator()
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        stub_a = orchestrator_pb2_grpc.AgentServiceStub(ca)
        stub_b = orchestrator_pb2_grpc.AgentServiceStub(cb)
        session = await create(stub_a)
        await turn(stub_a, session.session_id, "turn one")
        await turn(stub_b, session.session_id, "turn two")
        # The in-flight rule holds across replicas (the lease is in the store).
        mesh.inference.compose_gate = asyncio.Event()
        mesh.inference.compose_started.clear()
        running = asyncio.create_task(turn(stub_a, session.session_id, "turn three"))
        await asyncio.wait_for(mesh.inference.compose_started.wait(), 10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await turn(stub_b, session.session_id, "interleaved")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        mesh.inference.compose_gate.set()
        await running
    await a.stop(grace=1)
    await b.stop(grace=1)

    restarted = await mesh.orchestrator()
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        events = await turn(stub, session.session_id, "turn four")
        assert events[0].turn_started.turn_index == 4
        stored = await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
        users = [m.content for m in stored.session.messages if m.role == common_pb2.ROLE_USER]
        assert users == ["turn one", "turn two", "turn three", "turn four"]
        assert stored.session.task_tool_calls == 12 and stored.session.turn_count == 4


async def chat_cli(address: str, *args: str, stdin: bytes | None = None) -> str:
    """Runs `agentmesh chat` against ``address``; returns its output (exit status 0)."""
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "chat",
        "--target",
        address,
        "--customer",
        "CUST-0042",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin", "TERM": "dumb"},
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode == 0, err.decode()
    return out.decode()


@SQLITE_ONLY
async def test_chat_cli_streams_answers_tool_calls_and_the_latency_table(mesh: Mesh) -> None:
    server = await mesh.orchestrator()
    text = await chat_cli(server.address, "-m", "Why was I charged twice?", "-m", "Thanks!")
    assert text.count(mesh.inference.answer) == 2
    assert text.count("<- crm_lookup OK") == 2
    assert text.count("Turn latency") == 2 and "Queue + prefill (TTFT)" in text
    assert "plan #1 [workhorse]" in text


PROPOSAL = "Refund 19.00 USD on INV-00012: charged twice"


@SQLITE_ONLY
@pytest.mark.parametrize("flag", ["--yes", "--no", None])
async def test_chat_cli_asks_before_a_proposed_write_and_sends_the_answer(
    mesh: Mesh, flag: str | None
) -> None:
    """With -m the flag decides (default no); the proposal is shown with its amount, the
    confirming or rejecting turn is sent and rendered."""
    mesh.inference.plan_tools = ["billing_lookup", "billing_refund"]
    server = await mesh.orchestrator()
    args = ["-m", "Please refund the duplicate charge."] + ([flag] if flag else [])
    text = await chat_cli(server.address, *args)
    assert "<- billing_refund PROPOSED" in text
    assert f"Proposed, not done yet: {PROPOSAL}" in text and "amount: 19.00 USD" in text
    [action_id] = set(re.findall(r"act_[0-9a-f]{20}", text))
    assert f"?? proposed {action_id}: {PROPOSAL} (19.00 USD)" in text
    refunds = mesh.tools.of_tool("billing_refund")
    if flag == "--yes":
        assert "Go ahead? yes (--yes)" in text
        assert f"== action {action_id} EXECUTED: {PROPOSAL}" in text
        assert "<- billing_refund OK" in text
        assert [r.invocation.idempotency_key for r in refunds] == [f"am-action-{action_id}"]
    else:
        assert "Go ahead? no (--no)" in text
        assert f"== action {action_id} REJECTED: {PROPOSAL}" in text
        assert "I will not do this" in text
        assert refunds == []
    assert text.count("Turn latency") == 2  # the proposing turn and the answering one


@SQLITE_ONLY
async def test_chat_cli_interactive_prompt_confirms_with_y(mesh: Mesh) -> None:
    mesh.inference.plan_tools = ["billing_lookup", "billing_refund"]
    server = await mesh.orchestrator()
    text = await chat_cli(server.address, stdin=b"Please refund the duplicate charge.\ny\n")
    assert "Go ahead? [y/n] (n):" in text
    [action_id] = set(re.findall(r"act_[0-9a-f]{20}", text))
    assert f"== action {action_id} EXECUTED: {PROPOSAL}" in text
    [refund] = mesh.tools.of_tool("billing_refund")
    assert refund.invocation.idempotency_key == f"am-action-{action_id}"


async def test_turn_metrics_are_exported(mesh: Mesh) -> None:
    server = await mesh.orchestrator()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        session = await create(stub)
        await turn(stub, session.session_id, "hello")
    registry = server.metrics_registry
    assert registry.get_sample_value("agentmesh_turns_total", {"outcome": "completed"}) == 1
    for tool in READS:
        labels = {"tool": tool, "status": "OK"}
        assert registry.get_sample_value("agentmesh_turn_tool_calls_total", labels) == 1
    assert registry.get_sample_value("agentmesh_turn_seconds_count") == 1
    cached = {"lane": "workhorse", "kind": "cached"}
    assert registry.get_sample_value("agentmesh_turn_tokens_total", cached) == 250


async def test_a_resumed_turn_reuses_its_finished_tool_calls(stub: Any, mesh: Mesh) -> None:
    """The reads of a turn cut mid-answer were recorded as they finished: its retry under the
    same request id runs again in place without calling them a second time."""
    session = await create(stub)
    request = pb.RunTurnRequest(
        session_id=session.session_id, user_message="Why was I charged twice?", request_id="r-1"
    )
    mesh.inference.compose_gate = asyncio.Event()  # never set: only a cancel ends it
    call = stub.RunTurn(request)
    async for event in call:
        if event.HasField("compose_delta"):
            break
    call.cancel()
    await asyncio.wait_for(mesh.inference.compose_cancelled.wait(), 10)
    mesh.inference.compose_gate = None
    assert [i.name for i in mesh.tools.invocations] == READS  # ran once, in the cut attempt
    for _ in range(50):
        try:
            events = [e async for e in stub.RunTurn(request)]
            break
        except grpc.aio.AioRpcError as err:  # the server may still be unwinding the old turn
            assert err.code() == grpc.StatusCode.ABORTED
            await asyncio.sleep(0.1)
    done = _of(events, "turn_completed")
    assert [d.outcome for d in done] == [pb.TURN_OUTCOME_COMPLETED]
    assert _of(events, "turn_started")[0].turn_index == 1  # the same turn, not a new one
    assert [(f.name, f.status) for f in _of(events, "tool_call_finished")] == [
        (name, "OK") for name in READS
    ]
    assert [i.name for i in mesh.tools.invocations] == READS  # not executed again
    stored = (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).session
    users = [m.content for m in stored.messages if m.role == common_pb2.ROLE_USER]
    assert users == ["Why was I charged twice?"]
    assert stored.messages[-1].content == mesh.inference.answer
