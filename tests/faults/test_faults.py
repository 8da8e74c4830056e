"""The fault suite: real service processes on 127.0.0.1 killed, stopped mid-call, or cut off
from their database. Each test is bounded (seconds); every turn and status it sees goes into
the suite's ledger (printed at the end: lost turns, duplicated writes, undefined statuses).

Engine-free: the tools processes are the real service with hashed embeddings, the inference
process is the real service over a fake engine (tests/faults/processes.py); downstreams of an
in-process orchestrator are the scripted fakes of tests/orchestrator/grpc_fakes.py.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Message, Role
from services.orchestrator.sessions.base import SessionRecord, SessionStore
from services.orchestrator.sessions.redis_store import RedisSessionStore
from services.orchestrator.sessions.sql import SqlSessionStore
from shared.errors import Unavailable
from tests.faults.conftest import Ledger
from tests.faults.mesh import FakeMesh, agent_stub, create, retry_delay_ms, start_mesh
from tests.faults.procs import Proc, free_port, spawn, tools_env, until_health
from tests.faults.proxy import TcpProxy
from tests.orchestrator.grpc_fakes import PRINCIPAL_HEADER, start_fake

ME = "CUST-0001"


async def _turn(
    stub: object, session_id: str, text: str, ledger: Ledger
) -> list[pb.RunTurnResponse]:
    """One turn as a caller runs it; the ledger learns its status and whether it finished."""
    request = pb.RunTurnRequest(session_id=session_id, user_message=text)
    events: list[pb.RunTurnResponse] = []
    try:
        async for event in stub.RunTurn(request, timeout=60):  # type: ignore[attr-defined]
            events.append(event)
    except grpc.aio.AioRpcError as err:
        ledger.status(err.code())
        ledger.turn(finished=err.code() != grpc.StatusCode.OK and _defined(err.code()))
        raise
    ledger.status(grpc.StatusCode.OK)
    ledger.turn(finished=any(e.HasField("turn_completed") for e in events))
    return events


def _defined(code: grpc.StatusCode) -> bool:
    # A turn refused with a status that says so is not lost: the caller knows to retry.
    return code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}


def _finished(events: list[pb.RunTurnResponse]) -> list[pb.ToolCallFinished]:
    return [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]


def _completed(events: list[pb.RunTurnResponse]) -> pb.TurnCompleted:
    [done] = [e.turn_completed for e in events if e.HasField("turn_completed")]
    return done


async def _tools_process(data_dir: Path, port: int, *hold: str) -> Proc:
    proc = await spawn(
        ["-m", "tests.faults.processes", "tools", *hold], tools_env(port, data_dir), port
    )
    await until_health(proc.address, serving=True)
    return proc


# ---------------------------------------------------------------- SIGTERM with calls in flight


async def test_sigterm_to_tools_drains_the_call_in_flight_and_exits_0(
    tmp_path: Path, ledger: Ledger
) -> None:
    proc = await _tools_process(tmp_path, free_port(), "--hold")
    try:
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = tools_pb2_grpc.ToolServiceStub(channel)
            call = asyncio.ensure_future(
                stub.ExecuteTools(
                    tools_pb2.ExecuteToolsRequest(
                        invocations=[
                            tools_pb2.ToolInvocation(
                                call_id="c1", name="crm_lookup", arguments_json="{}"
                            )
                        ]
                    ),
                    metadata=((PRINCIPAL_HEADER, f"customer:{ME}"),),
                    timeout=30,
                )
            )
            await proc.line("HELD")  # the call is inside the service
            proc.process.send_signal(signal.SIGTERM)
            await until_health(proc.address, serving=False)  # the stop has begun
            await proc.send("go")
            reply = await call
            ledger.status(grpc.StatusCode.OK)
            assert [r.call_id for r in reply.results] == ["c1"]
        assert await proc.wait() == 0
    finally:
        await proc.kill()


async def test_sigterm_to_inference_drains_the_stream_in_flight_and_exits_0(
    ledger: Ledger,
) -> None:
    port = free_port()
    env = {
        "AGENTMESH_INFERENCE_PORT": str(port),
        "AGENTMESH_INFERENCE_METRICS_PORT": "0",
        "AGENTMESH_INFERENCE_GRACE_SECONDS": "10",
    }
    proc = await spawn(["-m", "tests.faults.processes", "inference", "--hold"], env, port)
    try:
        await until_health(proc.address, serving=True)
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            user = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")]
            stream = stub.StreamGenerate(
                inference_pb2.StreamGenerateRequest(messages=user), timeout=30
            )
            first = await stream.read()
            assert first.text_delta
            await proc.line("HELD")  # generating, held after its first delta
            proc.process.send_signal(signal.SIGTERM)
            await until_health(proc.address, serving=False)
            await proc.send("go")
            rest = [m async for m in _rest(stream)]
            ledger.status(grpc.StatusCode.OK)
            assert rest[-1].HasField("summary")
            text = first.text_delta + "".join(m.text_delta for m in rest)
            assert text == "one two three four five six seven"
        assert await proc.wait() == 0
    finally:
        await proc.kill()


async def _rest(stream: grpc.aio.UnaryStreamCall) -> object:  # type: ignore[type-arg]
    while (message := await stream.read()) is not grpc.aio.EOF:
        yield message


async def test_sigterm_to_the_orchestrator_drains_the_turn_in_flight_and_exits_0(
    tmp_path: Path, ledger: Ledger
) -> None:
    inference_server, inference = await start_fake("inference")
    tools_server, _ = await start_fake("tools")
    port = free_port()
    store = f"sqlite+aiosqlite:///{tmp_path / 'sessions.sqlite'}"
    env = {
        "AGENTMESH_ORCHESTRATOR_PORT": str(port),
        "AGENTMESH_ORCHESTRATOR_METRICS_PORT": "0",
        "AGENTMESH_ORCHESTRATOR_GRACE_SECONDS": "10",
        "AGENTMESH_ORCHESTRATOR_INFERENCE__TARGET": inference_server.address,
        "AGENTMESH_ORCHESTRATOR_TOOLS__TARGET": tools_server.address,
        "AGENTMESH_ORCHESTRATOR_SESSION_STORE_URL": store,
        "AGENTMESH_ORCHESTRATOR_CAPS__TURN_BUDGET_S": "30",
    }
    proc = await spawn(["-m", "services.orchestrator"], env, port)
    try:
        await until_health(proc.address, serving=True)
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = agent_stub(channel)
            sid = await create(stub)
            inference.compose_gate = asyncio.Event()
            turn = asyncio.ensure_future(_turn(stub, sid, "Why was I charged twice?", ledger))
            await inference.compose_started.wait()  # mid-answer
            proc.process.send_signal(signal.SIGTERM)
            await until_health(proc.address, serving=False)
            inference.compose_gate.set()
            events = await turn
            assert _completed(events).outcome == pb.TURN_OUTCOME_COMPLETED
        assert await proc.wait() == 0
        # Its bookkeeping ran before the store closed: the lease is free, the turn stored.
        mesh = FakeMesh(inference, _, inference_server, tools_server, store)  # type: ignore[arg-type]
        server, _service = await mesh.orchestrator()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = agent_stub(channel)
            got = await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
            assert got.session.turn_count == 1
            events = await _turn(stub, sid, "Thanks", ledger)
            assert _completed(events).outcome == pb.TURN_OUTCOME_COMPLETED
        await server.stop(grace=0.5)
    finally:
        await proc.kill()
        await inference_server.stop(grace=0.5)
        await tools_server.stop(grace=0.5)


# ---------------------------------------------------------------- kill -9 the tools service


async def test_kill_9_tools_mid_turn_answers_gracefully_and_the_next_turn_works(
    tmp_path: Path, ledger: Ledger
) -> None:
    port = free_port()
    tools = await _tools_process(tmp_path, port)
    inference_server, inference = await start_fake("inference")
    mesh = FakeMesh(
        inference,
        None,  # type: ignore[arg-type]
        inference_server,
        _Address(tools.address),  # type: ignore[arg-type]
        f"sqlite+aiosqlite:///{tmp_path / 'sessions.sqlite'}",
    )
    try:
        server, service = await mesh.orchestrator()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = agent_stub(channel)
            sid = await create(stub, customer_id=ME)
            # Round 1 reads; the observation waits; tools dies; round 2 calls kb_search.
            inference.observe_gate = asyncio.Event()
            inference.answer_calls = [[("kb_search", {"query": "refund policy"})]]
            turn = asyncio.ensure_future(_turn(stub, sid, "Why was I charged twice?", ledger))
            await inference.observe_started.wait()
            tools.process.kill()
            assert await tools.wait() == -signal.SIGKILL
            inference.observe_gate.set()
            events = await turn
            done = _completed(events)
            finished = _finished(events)
            assert [f.status for f in finished if f.round == 1] == ["OK"] * 3
            late = [f for f in finished if f.round == 2]
            assert [f.name for f in late] == ["kb_search"]
            assert late[0].status == "UNAVAILABLE"  # the failure was observed ...
            assert done.outcome == pb.TURN_OUTCOME_COMPLETED  # ... and answered around
            assert done.answer

            tools = await _tools_process(tmp_path, port)  # restarted, as `agentmesh up` does
            inference.observe_gate = None
            await _ready(service._channels[1])  # the orchestrator's channel reconnected
            events = await _turn(stub, sid, "And the refund policy?", ledger)
            assert _completed(events).outcome == pb.TURN_OUTCOME_COMPLETED
            assert [f.status for f in _finished(events)] == ["OK"] * 3
            session = await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
            assert session.session.turn_count == 2
    finally:
        await mesh.close()
        await tools.kill()


class _Address:
    """Stands in for a server in FakeMesh: only its address is used."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def stop(self, grace: float) -> None:
        pass


async def _ready(channel: grpc.aio.Channel, timeout_s: float = 30) -> None:
    async def wait() -> None:
        state = channel.get_state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    await asyncio.wait_for(wait(), timeout_s)


# ---------------------------------------------------------------- kill -9 the orchestrator


async def test_kill_9_orchestrator_mid_turn_and_the_retry_completes_on_another_replica(
    tmp_path: Path, ledger: Ledger
) -> None:
    """A confirming turn (the refund executes, then the answer streams) loses its replica to
    SIGKILL; the client retries the same request id on a second replica sharing the store
    (ABORTED with a retry hint, honoured, for as long as the dead replica's one-second lease
    lives) and it completes there: the refund went out under one idempotency key, no message
    is lost or doubled."""
    inference_server, inference = await start_fake("inference")
    tools_server, tools = await start_fake("tools")
    store = f"sqlite+aiosqlite:///{tmp_path / 'sessions.sqlite'}"
    port = free_port()
    env = {
        "AGENTMESH_ORCHESTRATOR_PORT": str(port),
        "AGENTMESH_ORCHESTRATOR_METRICS_PORT": "0",
        "AGENTMESH_ORCHESTRATOR_INFERENCE__TARGET": inference_server.address,
        "AGENTMESH_ORCHESTRATOR_TOOLS__TARGET": tools_server.address,
        "AGENTMESH_ORCHESTRATOR_SESSION_STORE_URL": store,
        "AGENTMESH_ORCHESTRATOR_CAPS__TURN_BUDGET_S": "30",
        "AGENTMESH_ORCHESTRATOR_LEASE_TTL_S": "1",
    }
    doomed = await spawn(["-m", "services.orchestrator"], env, port)
    mesh = FakeMesh(inference, tools, inference_server, tools_server, store)
    try:
        await until_health(doomed.address, serving=True)
        async with grpc.aio.insecure_channel(doomed.address) as channel:
            stub = agent_stub(channel)
            sid = await create(stub)
            inference.plan_tools = ["billing_lookup", "billing_refund"]
            events = await _turn(stub, sid, "Please refund the duplicate charge.", ledger)
            [proposed] = [e.action_proposed for e in events if e.HasField("action_proposed")]
            action_id = proposed.action.action_id
            inference.compose_gate = asyncio.Event()
            confirm = pb.RunTurnRequest(
                session_id=sid, confirm_action_id=action_id, request_id="confirm-1"
            )
            attempt = asyncio.ensure_future(_collect(stub, confirm))
            await inference.compose_started.wait()  # the refund ran; the answer is streaming
            doomed.process.kill()
            assert await doomed.wait() == -signal.SIGKILL
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await attempt
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            ledger.status(cut.value.code())
        inference.compose_gate = None

        replica, _ = await mesh.orchestrator(lease_ttl_s=1.0)
        async with grpc.aio.insecure_channel(replica.address) as channel:
            stub = agent_stub(channel)
            aborted = 0
            for _ in range(20):  # the dead replica's lease lapses within its ttl
                try:
                    retried = await _collect(stub, confirm)
                    break
                except grpc.aio.AioRpcError as err:
                    ledger.status(err.code())
                    assert err.code() == grpc.StatusCode.ABORTED
                    aborted += 1
                    await asyncio.sleep(retry_delay_ms(err) / 1000)
            ledger.turn(finished=any(e.HasField("turn_completed") for e in retried))
            ledger.status(grpc.StatusCode.OK)
            assert _completed(retried).outcome == pb.TURN_OUTCOME_COMPLETED
            keys = [e.invocation.idempotency_key for e in tools.of_tool("billing_refund")]
            # One refund sent, once: the dead replica recorded it executed before the answer
            # streamed, so the retry does not send it again (its key would dedupe it if it did).
            assert keys == [f"am-action-{action_id}"]
            ledger.writes(keys)
            session = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
            assert session.turn_count == 2
            users = [m.content for m in session.messages if m.role == common_pb2.ROLE_USER]
            assert users == [
                "Please refund the duplicate charge.",
                f"Confirmed: {proposed.action.summary}",
            ]
            [action] = [a for a in session.actions if a.action_id == action_id]
            assert action.state == pb.ACTION_STATE_EXECUTED
    finally:
        await doomed.kill()
        await mesh.close()


async def _collect(stub: object, request: pb.RunTurnRequest) -> list[pb.RunTurnResponse]:
    return [e async for e in stub.RunTurn(request, timeout=60)]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- kill -9 inference mid-answer


async def test_kill_9_inference_mid_answer_fails_the_turn_and_its_retry_completes(
    tmp_path: Path, ledger: Ledger
) -> None:
    port = free_port()
    env = {"AGENTMESH_INFERENCE_PORT": str(port), "AGENTMESH_INFERENCE_METRICS_PORT": "0"}
    role = ["-m", "tests.faults.processes", "scripted-inference"]
    inference = await spawn([*role, "--hold"], env, port)
    tools_server, tools = await start_fake("tools")
    mesh = FakeMesh(
        None,  # type: ignore[arg-type]
        tools,
        _Address(inference.address),  # type: ignore[arg-type]
        tools_server,
        f"sqlite+aiosqlite:///{tmp_path / 'sessions.sqlite'}",
    )
    try:
        await until_health(inference.address, serving=True)
        server, service = await mesh.orchestrator()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = agent_stub(channel)
            sid = await create(stub)
            request = pb.RunTurnRequest(
                session_id=sid, user_message="Why was I charged twice?", request_id="t-1"
            )
            events: list[pb.RunTurnResponse] = []

            async def first_attempt() -> None:
                async for event in stub.RunTurn(request, timeout=60):
                    events.append(event)

            attempt = asyncio.ensure_future(first_attempt())
            await inference.line("HELD")  # the answer is streaming, held after one word
            inference.process.kill()
            assert await inference.wait() == -signal.SIGKILL
            await attempt
            ledger.status(grpc.StatusCode.OK)
            ledger.turn(finished=True)
            done = _completed(events)
            assert done.outcome == pb.TURN_OUTCOME_FAILED  # never COMPLETED with a partial
            assert done.notes
            kept = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session

            inference = await spawn(role, env, port)  # restarted
            await until_health(inference.address, serving=True)
            await _ready(service._channels[0])
            retried = await _turn_request(stub, request, ledger)
            again = _completed(retried)
            assert again.outcome == pb.TURN_OUTCOME_COMPLETED
            assert retried[0].turn_started.turn_index == 1  # the same turn, run again
            session = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
            assert session.turn_count == 1
            users = [m for m in session.messages if m.role == common_pb2.ROLE_USER]
            assert [m.content for m in users] == ["Why was I charged twice?"]
            # The failed attempt was stored as it ran (and said what it could not do); its
            # retry replaced it: one question, one answer, no partial answer left behind.
            assert kept.turn_count == 1
            assert [m.content for m in kept.messages if m.role == common_pb2.ROLE_USER] == [
                "Why was I charged twice?"
            ]
            assert any("What I could not do" in m.content for m in kept.messages)
            assert all("What I could not do" not in m.content for m in session.messages)
            assert session.messages[-1].content == again.answer
    finally:
        await mesh.close()
        await inference.kill()


async def _turn_request(
    stub: object, request: pb.RunTurnRequest, ledger: Ledger
) -> list[pb.RunTurnResponse]:
    events = [e async for e in stub.RunTurn(request, timeout=60)]  # type: ignore[attr-defined]
    ledger.status(grpc.StatusCode.OK)
    ledger.turn(finished=any(e.HasField("turn_completed") for e in events))
    return events


# ---------------------------------------------------------------- the session database cut off


@pytest.mark.postgres
async def test_an_unreachable_session_database_is_unavailable_and_recovers(
    ledger: Ledger,
) -> None:
    proxy = TcpProxy("127.0.0.1", 5432)
    port = await proxy.start()
    mesh = await start_mesh(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test")
    prefix = f"fault_{uuid.uuid4().hex[:8]}_"
    try:
        server, service = await mesh.orchestrator(session_store_prefix=prefix)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = agent_stub(channel)
            sid = await create(stub)
            events = await _turn(stub, sid, "Why was I charged twice?", ledger)
            assert _completed(events).outcome == pb.TURN_OUTCOME_COMPLETED
            before = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session

            await proxy.cut_line()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _turn(stub, sid, "Still there?", ledger)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Traceback" not in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as read:
                await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
            assert read.value.code() == grpc.StatusCode.UNAVAILABLE
            ledger.status(read.value.code())

            proxy.restore()
            intact = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
            assert intact == before  # nothing half-written while it was away
            events = await _turn(stub, sid, "Still there?", ledger)
            assert _completed(events).outcome == pb.TURN_OUTCOME_COMPLETED
            after = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
            assert after.turn_count == 2
            assert list(after.messages)[: len(before.messages)] == list(before.messages)
        await service.store.drop_tables()  # type: ignore[attr-defined]
    finally:
        await mesh.close()
        await proxy.close()


@pytest.mark.parametrize(
    ("kind", "upstream"),
    [
        pytest.param("postgres", 5432, marks=pytest.mark.postgres),
        pytest.param("redis", 6379, marks=pytest.mark.redis),
    ],
)
async def test_each_networked_store_cut_off_is_unavailable_then_recovers(
    kind: str, upstream: int, ledger: Ledger
) -> None:
    proxy = TcpProxy("127.0.0.1", upstream)
    port = await proxy.start()
    prefix = f"fault_{uuid.uuid4().hex[:8]}_"
    store: SessionStore
    if kind == "postgres":
        store = SqlSessionStore(
            f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test", table_prefix=prefix
        )
    else:
        store = RedisSessionStore(f"redis://127.0.0.1:{port}/5", key_prefix=prefix)
    await store.open()
    try:
        await store.create(SessionRecord(session_id="s1", caps=Caps()))
        token = await store.acquire_lease("s1", "a", 30)
        await store.append_messages("s1", 1, [Message(Role.USER, "kept")], token=token)
        await proxy.cut_line()
        with pytest.raises(Unavailable):
            await store.get("s1")
        with pytest.raises(Unavailable):
            await store.append_messages("s1", 1, [Message(Role.USER, "lost")], token=token)
        ledger.status(grpc.StatusCode.UNAVAILABLE)
        proxy.restore()
        got = await store.get("s1")
        assert got is not None and [m.content for m in got.messages] == ["kept"]
        await store.append_messages("s1", 1, [Message(Role.USER, "again")], token=token)
    finally:
        if isinstance(store, SqlSessionStore):
            await store.drop_tables()
        else:
            await store.drop_keys()
        await store.close()
        await proxy.close()
