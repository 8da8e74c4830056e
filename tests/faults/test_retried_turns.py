"""Retried turns through a real orchestrator (fake downstreams, real SQLite session store):
the same request id never runs a finished turn twice, a running one answers ABORTED with a
retry hint, a dead replica's attempt runs again in its place, and a dead downstream ends the
turn FAILED."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb

from services.orchestrator.loop.types import Message, Role
from services.orchestrator.sessions.base import LeaseLost, TurnRecord
from tests.faults.conftest import Ledger
from tests.faults.mesh import (
    FakeMesh,
    agent_stub,
    completed,
    create,
    error_reason,
    kinds,
    retry_delay_ms,
    run,
    start_mesh,
)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[FakeMesh]:
    m = await start_mesh(f"sqlite+aiosqlite:///{tmp_path / 'sessions.sqlite'}")
    try:
        yield m
    finally:
        await m.close()


async def _session(stub: object, session_id: str) -> pb.Session:
    reply = await stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=10)  # type: ignore[attr-defined]
    return reply.session


async def test_a_finished_turn_replays_instead_of_running_again(mesh: FakeMesh) -> None:
    server, _ = await mesh.orchestrator()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = agent_stub(channel)
        sid = await create(stub)
        first = await run(stub, sid, "Why was I charged twice?", request_id="req-1")
        done = completed(first)
        assert done.outcome == pb.TURN_OUTCOME_COMPLETED
        seen, executed = len(mesh.inference.seen), len(mesh.tools.executed)
        before = await _session(stub, sid)

        again = await run(stub, sid, "Why was I charged twice?", request_id="req-1")
        assert kinds(again) == ["turn_started", "turn_completed"]
        assert again[0].turn_started == first[0].turn_started
        assert completed(again) == done
        # Nothing ran: no generation, no tool call, no new message or turn.
        assert len(mesh.inference.seen) == seen and len(mesh.tools.executed) == executed
        after = await _session(stub, sid)
        assert after.turn_count == before.turn_count == 1
        assert list(after.messages) == list(before.messages)

        # Another request id is another turn.
        other = await run(stub, sid, "And the other invoice?", request_id="req-2")
        assert completed(other).outcome == pb.TURN_OUTCOME_COMPLETED
        assert (await _session(stub, sid)).turn_count == 2


async def test_a_turn_still_running_answers_aborted_with_a_retry_hint(mesh: FakeMesh) -> None:
    server, _ = await mesh.orchestrator()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = agent_stub(channel)
        sid = await create(stub)
        mesh.inference.compose_gate = asyncio.Event()
        running = asyncio.create_task(run(stub, sid, "Why was I charged twice?", request_id="r"))
        await mesh.inference.compose_started.wait()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, sid, "Why was I charged twice?", request_id="r")
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert error_reason(err.value) == "TURN_RUNNING"
        assert retry_delay_ms(err.value) > 0
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await run(stub, sid, "Something else", request_id="r-other")
        assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        mesh.inference.compose_gate.set()
        first = await running
        replay = await run(stub, sid, "Why was I charged twice?", request_id="r")
        assert completed(replay) == completed(first)
        assert (await _session(stub, sid)).turn_count == 1


async def test_a_dead_replicas_attempt_runs_again_without_duplicating_messages(
    mesh: FakeMesh,
) -> None:
    server, service = await mesh.orchestrator()
    store = service.store
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = agent_stub(channel)
        sid = await create(stub)
        # A replica took the turn, recorded it, wrote its first messages and died: its short
        # lease lapses with nobody renewing it.
        token = await store.acquire_lease(sid, "dead-replica", 0.05)
        await store.update_counters(
            sid, turn_count=1, task_tool_calls=0, task_time_used_s=0.0, token=token
        )
        await store.put_turn(TurnRecord(sid, "req-x", 1, ""), token=token)
        partial = [Message(Role.USER, "Why was I charged twice?")]
        await store.append_messages(sid, 1, partial, token=token)
        await asyncio.sleep(0.1)  # the lease's time runs out (nothing to await: it is a clock)

        events = await run(stub, sid, "Why was I charged twice?", request_id="req-x")
        assert completed(events).outcome == pb.TURN_OUTCOME_COMPLETED
        assert events[0].turn_started.turn_index == 1
        session = await _session(stub, sid)
        assert session.turn_count == 1
        users = [m.content for m in session.messages if m.role == common_pb2.ROLE_USER]
        assert users == ["Why was I charged twice?"]  # once, not twice
        # The dead replica, were it to wake up, can no longer write.
        with pytest.raises(LeaseLost):
            await store.append_messages(sid, 1, partial, token=token)


async def test_a_dead_answer_stage_ends_the_turn_failed_and_says_so(mesh: FakeMesh) -> None:
    server, _ = await mesh.orchestrator()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = agent_stub(channel)
        sid = await create(stub)
        mesh.inference.compose_gate = asyncio.Event()  # holds the answer after one word
        turn = asyncio.create_task(run(stub, sid, "Why was I charged twice?", request_id="d"))
        await mesh.inference.compose_started.wait()
        await mesh.inference_server.stop(grace=0)  # inference dies mid-compose
        events = await turn
        done = completed(events)
        assert done.outcome == pb.TURN_OUTCOME_FAILED
        assert "the answer could not be completed (unavailable)" in done.notes  # it says why
        session = await _session(stub, sid)
        # Never a partial answer passed off as the reply: the one stored reply is what the
        # caller saw (the word streamed before the engine died), then what could not be done.
        replies = [
            m.content for m in session.messages if m.role == common_pb2.ROLE_ASSISTANT and m.content
        ]
        assert replies == [done.answer]
        assert done.answer.endswith(
            "\n\nWhat I could not do: the answer could not be completed (unavailable)."
        ), done.answer


async def test_the_heartbeat_holds_a_short_lease_for_a_long_turn(mesh: FakeMesh) -> None:
    server, service = await mesh.orchestrator()
    second, _ = await mesh.orchestrator()  # another replica on the same store
    assert service.agent is not None
    service.agent._lease_ttl_s = 0.3  # a lease of 0.3 s, renewed every 0.1 s
    async with (
        grpc.aio.insecure_channel(server.address) as channel,
        grpc.aio.insecure_channel(second.address) as other_channel,
    ):
        stub, other = agent_stub(channel), agent_stub(other_channel)
        sid = await create(stub)
        mesh.inference.compose_gate = asyncio.Event()
        turn = asyncio.create_task(run(stub, sid, "Why was I charged twice?"))
        await mesh.inference.compose_started.wait()
        await asyncio.sleep(1.0)  # over three lease lifetimes: only renewals keep it
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(other, sid, "Me too?")
        assert error_reason(err.value) == "TURN_IN_FLIGHT"
        mesh.inference.compose_gate.set()
        assert completed(await turn).outcome == pb.TURN_OUTCOME_COMPLETED
        # Released at the end: the other replica runs the next turn at once.
        assert completed(await run(other, sid, "Thanks")).outcome == pb.TURN_OUTCOME_COMPLETED


async def test_a_retried_confirmation_moves_money_once(mesh: FakeMesh, ledger: Ledger) -> None:
    """The confirming turn sent twice with one request id (a client that lost the reply),
    then once more with a new id: one refund, under the action's idempotency key."""
    server, _ = await mesh.orchestrator()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = agent_stub(channel)
        sid = await create(stub)
        mesh.inference.plan_tools = ["billing_lookup", "billing_refund"]
        events = await run(stub, sid, "Please refund the duplicate charge.", request_id="p")
        [proposed] = [e.action_proposed for e in events if e.HasField("action_proposed")]
        action_id = proposed.action.action_id
        replies = []
        for request_id in ["confirm-1", "confirm-1", "confirm-2"]:
            replies.append(
                await run(stub, sid, "", confirm_action_id=action_id, request_id=request_id)
            )
        for reply in replies:
            ledger.turn(finished=any(e.HasField("turn_completed") for e in reply))
            ledger.status(grpc.StatusCode.OK)
        assert completed(replies[1]) == completed(replies[0])  # replayed
        keys = [e.invocation.idempotency_key for e in mesh.tools.of_tool("billing_refund")]
        ledger.writes(keys)
        # Executed once: the replay ran nothing, the new id found the action EXECUTED.
        assert keys == [f"am-action-{action_id}"]
