"""The session stores (SQLite, PostgreSQL, Redis) against the same contract."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Action, ActionState, Message, Role, ToolCall
from services.orchestrator.sessions.base import (
    LeaseLost,
    SessionRecord,
    SessionState,
    SessionStore,
    TurnRecord,
)
from services.orchestrator.sessions.factory import store_from_url
from services.orchestrator.sessions.redis_store import RedisSessionStore
from services.orchestrator.sessions.sql import SqlSessionStore
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from tests.orchestrator.conftest import REDIS_URL, close_store, open_store
from tests.orchestrator.grpc_fakes import FakeInferenceServicer, start_fake
from tests.orchestrator.test_servicer import Mesh, create, turn


def twin(store: SessionStore) -> SessionStore:
    """A second, unopened store on the same backend and prefix: another replica."""
    if isinstance(store, SqlSessionStore):
        return SqlSessionStore(
            str(store.engine.url.render_as_string(hide_password=False)),
            table_prefix=store.sessions.name.removesuffix("sessions"),
        )
    assert isinstance(store, RedisSessionStore)
    return RedisSessionStore(REDIS_URL, key_prefix=store._prefix)


def record(session_id: str = "sess-1") -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        caps=Caps(max_tool_calls_per_task=7, turn_budget_s=12.5),
        customer_id="CUST-0042",
        metadata={"channel": "chat"},
    )


async def test_create_get_round_trips_every_field(store: SessionStore) -> None:
    rec = record()
    await store.create(rec)
    got = await store.get("sess-1")
    assert got is not None
    assert got.session_id == "sess-1"
    assert got.caps == rec.caps
    assert got.customer_id == "CUST-0042"
    assert got.state is SessionState.ACTIVE
    assert got.metadata == {"channel": "chat"}
    assert got.messages == []
    assert got.actions == []
    assert got.created_at == pytest.approx(rec.created_at)
    assert await store.get("nope") is None


async def test_creating_a_taken_id_is_already_exists_and_changes_nothing(
    store: SessionStore,
) -> None:
    await store.create(record())
    other = SessionRecord(session_id="sess-1", caps=Caps(), customer_id="CUST-9999")
    with pytest.raises(AlreadyExists):
        await store.create(other)
    got = await store.get("sess-1")
    assert got is not None and got.customer_id == "CUST-0042"


async def test_messages_append_in_order_with_tool_calls(store: SessionStore) -> None:
    await store.create(record())
    first = [Message(Role.USER, "hi, why was I charged twice?")]
    second = [
        Message(Role.ASSISTANT, "", tool_calls=(ToolCall("c1", "crm_lookup", '{"a":1}'),)),
        Message(Role.TOOL, "<tool_result>{}</tool_result>", tool_call_id="c1", name="crm_lookup"),
        Message(Role.ASSISTANT, "You were charged twice."),
    ]
    await store.append_messages("sess-1", 1, first)
    await store.append_messages("sess-1", 1, second)
    await store.append_messages("sess-1", 2, [Message(Role.USER, "thanks")])
    got = await store.get("sess-1")
    assert got is not None
    assert got.messages == [*first, *second, Message(Role.USER, "thanks")]


async def test_counters_and_end(store: SessionStore) -> None:
    await store.create(record())
    await store.update_counters("sess-1", turn_count=3, task_tool_calls=9, task_time_used_s=4.25)
    got = await store.get("sess-1")
    assert got is not None
    assert (got.turn_count, got.task_tool_calls, got.task_time_used_s) == (3, 9, 4.25)
    assert await store.end("sess-1") is True
    ended = await store.get("sess-1")
    assert ended is not None and ended.state is SessionState.ENDED
    assert await store.end("unknown") is False


async def test_lease_is_exclusive_until_released(store: SessionStore) -> None:
    await store.create(record())
    assert await store.acquire_lease("sess-1", "owner-a", 30)
    assert not await store.acquire_lease("sess-1", "owner-b", 30)
    await store.release_lease("sess-1", "owner-b")  # not the holder: no effect
    assert not await store.acquire_lease("sess-1", "owner-b", 30)
    await store.release_lease("sess-1", "owner-a")
    assert await store.acquire_lease("sess-1", "owner-b", 30)


async def test_expired_lease_frees_itself(store: SessionStore) -> None:
    """A replica that died mid-turn does not block the session forever."""
    await store.create(record())
    assert await store.acquire_lease("sess-1", "dead-replica", 0.2)
    await asyncio.sleep(0.4)
    assert await store.acquire_lease("sess-1", "live-replica", 30)


async def test_concurrent_acquires_have_exactly_one_winner(store: SessionStore) -> None:
    await store.create(record())
    results = await asyncio.gather(
        *(store.acquire_lease("sess-1", f"owner-{i}", 30) for i in range(8))
    )
    assert sum(results) == 1


async def test_a_second_store_instance_sees_the_same_state(
    store: SessionStore, tmp_path: Path
) -> None:
    """Any replica continues any session: a second connection to the same backend."""
    await store.create(record())
    await store.append_messages("sess-1", 1, [Message(Role.USER, "hello")])
    other = twin(store)
    await other.open()
    try:
        got = await other.get("sess-1")
        assert got is not None and got.messages == [Message(Role.USER, "hello")]
        assert await store.acquire_lease("sess-1", "a", 30)
        assert not await other.acquire_lease("sess-1", "b", 30)
    finally:
        await other.close()


async def test_sqlite_store_survives_reopening(tmp_path: Path) -> None:
    first = await open_store("sqlite", tmp_path)
    await first.create(record())
    await first.append_messages("sess-1", 1, [Message(Role.USER, "persist me")])
    await first.close()
    second = await open_store("sqlite", tmp_path)
    try:
        got = await second.get("sess-1")
        assert got is not None and got.messages[0].content == "persist me"
    finally:
        await close_store(second)


def test_store_from_url_picks_the_backend() -> None:
    assert isinstance(store_from_url("sqlite+aiosqlite:///x.db"), SqlSessionStore)
    assert isinstance(store_from_url("postgresql+asyncpg://u@h/db"), SqlSessionStore)
    assert isinstance(store_from_url("redis://127.0.0.1:6379/0"), RedisSessionStore)
    with pytest.raises(ValueError, match="unsupported"):
        store_from_url("mongodb://x")


# --- proposed actions ---------------------------------------------------------------------

T0 = 1_764_000_000.123456


def proposed(
    action_id: str = "act-1", session_id: str = "sess-1", *, created_at: float = T0
) -> Action:
    return Action(
        action_id=action_id,
        session_id=session_id,
        tool="billing_refund",
        arguments_json='{"amount_cents":1250,"customer_id":"CUST-0042","invoice_id":"INV-7"}',
        summary="Rückerstattung 12,50 € für INV-7",
        amount_cents=1250,
        currency="EUR",
        turn_index=3,
        created_at=created_at,
        expires_at=created_at + 300.25,
    )


def claimed(action: Action, by: str) -> Action:
    """The action moved to EXECUTING, marked with who moved it."""
    return dataclasses.replace(action, state=ActionState.EXECUTING, result_json=f'{{"by":"{by}"}}')


async def test_actions_round_trip_every_field(store: SessionStore) -> None:
    await store.create(record())
    pending = proposed()
    # Every field away from its default (the store stores whatever it is given).
    resolved = Action(
        action_id="act-2",
        session_id="sess-1",
        tool="billing_credit",
        arguments_json='{"amount_cents":5000000000,"customer_id":"CUST-0042"}',
        summary="Credit 50,000,000.00 USD",
        amount_cents=5_000_000_000,
        currency="USD",
        state=ActionState.FAILED,
        turn_index=4,
        created_at=T0 + 1.5,
        expires_at=T0 + 301.75,
        resolved_at=T0 + 2.000125,
        result_json='{"error":"declined"}',
        error_message="the billing service declined the credit",
    )
    await store.add_action(pending)
    await store.add_action(resolved)
    assert await store.get_action("sess-1", "act-1") == pending
    assert await store.get_action("sess-1", "act-2") == resolved
    got = await store.get("sess-1")
    assert got is not None
    assert got.actions == [pending, resolved]
    assert await store.get_action("sess-1", "act-404") is None
    # An action is found only through its own session.
    await store.create(record("sess-2"))
    assert await store.get_action("sess-2", "act-1") is None


async def test_adding_a_taken_action_id_is_already_exists_and_changes_nothing(
    store: SessionStore,
) -> None:
    await store.create(record())
    await store.create(record("sess-2"))
    first = proposed()
    await store.add_action(first)
    with pytest.raises(AlreadyExists):
        await store.add_action(dataclasses.replace(first, summary="another", amount_cents=1))
    # Ids are unique store-wide: the idempotency key derives from the id alone.
    with pytest.raises(AlreadyExists):
        await store.add_action(proposed(session_id="sess-2"))
    assert await store.get_action("sess-1", "act-1") == first
    assert await store.get_action("sess-2", "act-1") is None
    got = await store.get("sess-1")
    assert got is not None and got.actions == [first]


async def test_adding_an_action_to_an_unknown_session_is_not_found(store: SessionStore) -> None:
    with pytest.raises(NotFound):
        await store.add_action(proposed(session_id="ghost"))
    assert await store.get_action("ghost", "act-1") is None
    # Nothing was reserved: the id is still free for a real session.
    await store.create(record())
    await store.add_action(proposed())
    assert await store.get_action("sess-1", "act-1") == proposed()


async def test_transition_swaps_when_the_state_is_expected(store: SessionStore) -> None:
    await store.create(record())
    pending = proposed()
    await store.add_action(pending)
    executing = dataclasses.replace(pending, state=ActionState.EXECUTING)
    assert (
        await store.transition_action(
            "sess-1", "act-1", expected=[ActionState.PENDING], new=executing
        )
        == executing
    )
    assert await store.get_action("sess-1", "act-1") == executing
    executed = dataclasses.replace(
        executing,
        state=ActionState.EXECUTED,
        resolved_at=T0 + 9.5,
        result_json='{"refund_id":"RF-1"}',
    )
    assert (
        await store.transition_action(
            "sess-1",
            "act-1",
            expected=[ActionState.PENDING, ActionState.EXECUTING],
            new=executed,
        )
        == executed
    )
    got = await store.get("sess-1")
    assert got is not None and got.actions == [executed]


async def test_transition_is_refused_when_the_state_is_not_expected(store: SessionStore) -> None:
    await store.create(record())
    rejected = dataclasses.replace(proposed(), state=ActionState.REJECTED, resolved_at=T0 + 1)
    await store.add_action(rejected)
    attempt = claimed(rejected, "late-confirm")
    assert (
        await store.transition_action(
            "sess-1", "act-1", expected=[ActionState.PENDING], new=attempt
        )
        == rejected
    )
    assert await store.transition_action("sess-1", "act-1", expected=[], new=attempt) == rejected
    assert await store.get_action("sess-1", "act-1") == rejected


async def test_transition_of_an_unknown_action_is_none(store: SessionStore) -> None:
    await store.create(record())
    await store.add_action(proposed())
    ghost = proposed("act-404")
    assert (
        await store.transition_action(
            "sess-1", "act-404", expected=[ActionState.PENDING], new=claimed(ghost, "x")
        )
        is None
    )
    # The same id under another session is not this session's action.
    elsewhere = proposed(session_id="sess-2")
    assert (
        await store.transition_action(
            "sess-2", "act-1", expected=[ActionState.PENDING], new=claimed(elsewhere, "x")
        )
        is None
    )
    assert await store.get_action("sess-1", "act-1") == proposed()


async def test_transition_must_keep_the_actions_identity(store: SessionStore) -> None:
    await store.create(record())
    await store.add_action(proposed())
    with pytest.raises(InvalidArgument):
        await store.transition_action(
            "sess-1",
            "act-1",
            expected=[ActionState.PENDING],
            new=claimed(proposed("act-other"), "x"),
        )
    assert await store.get_action("sess-1", "act-1") == proposed()


async def test_concurrent_transitions_have_exactly_one_winner(store: SessionStore) -> None:
    await store.create(record())
    await store.add_action(proposed())
    news = [claimed(proposed(), f"contender-{i}") for i in range(8)]
    results = await asyncio.gather(
        *(
            store.transition_action("sess-1", "act-1", expected=[ActionState.PENDING], new=n)
            for n in news
        )
    )
    winners = [n for n, r in zip(news, results, strict=True) if r == n]
    assert len(winners) == 1
    # Every loser was told the winner's action.
    assert results == [winners[0]] * len(news)
    assert await store.get_action("sess-1", "act-1") == winners[0]


async def test_concurrent_transitions_from_two_replicas_have_exactly_one_winner(
    store: SessionStore,
) -> None:
    await store.create(record())
    await store.add_action(proposed())
    other = twin(store)
    await other.open()
    try:
        replicas = [store, other] * 4
        news = [claimed(proposed(), f"replica-{i % 2}-{i}") for i in range(len(replicas))]
        results = await asyncio.gather(
            *(
                r.transition_action("sess-1", "act-1", expected=[ActionState.PENDING], new=n)
                for r, n in zip(replicas, news, strict=True)
            )
        )
        winners = [n for n, r in zip(news, results, strict=True) if r == n]
        assert len(winners) == 1
        assert results == [winners[0]] * len(news)
        assert await other.get_action("sess-1", "act-1") == winners[0]
        assert await store.get_action("sess-1", "act-1") == winners[0]
    finally:
        await other.close()


async def test_actions_survive_reopening_the_store(store: SessionStore) -> None:
    await store.create(record())
    first, second = proposed("act-1"), proposed("act-2", created_at=T0 + 1)
    await store.add_action(first)
    await store.add_action(second)
    executing = claimed(first, "before-restart")
    await store.transition_action("sess-1", "act-1", expected=[ActionState.PENDING], new=executing)
    await store.close()
    await store.open()
    got = await store.get("sess-1")
    assert got is not None and got.actions == [executing, second]
    assert await store.get_action("sess-1", "act-2") == second
    with pytest.raises(AlreadyExists):
        await store.add_action(first)


async def test_actions_are_listed_oldest_first(store: SessionStore) -> None:
    """By created_at; actions created at the same moment keep the order they were added in."""
    await store.create(record())
    await store.create(record("sess-2"))
    latest = proposed("act-c", created_at=T0 + 10)
    tie_first, tie_second = proposed("act-b"), proposed("act-a")
    await store.add_action(latest)
    await store.add_action(tie_first)
    await store.add_action(proposed("act-other", "sess-2", created_at=T0 + 5))
    await store.add_action(tie_second)
    oldest = proposed("act-z", created_at=T0 - 10)
    await store.add_action(oldest)
    got = await store.get("sess-1")
    assert got is not None
    assert got.actions == [oldest, tie_first, tie_second, latest]


async def test_ending_a_session_keeps_its_actions(store: SessionStore) -> None:
    await store.create(record())
    await store.add_action(proposed())
    assert await store.end("sess-1") is True
    got = await store.get("sess-1")
    assert got is not None and got.state is SessionState.ENDED
    assert got.actions == [proposed()]


async def test_sqlite_connections_use_wal_and_a_busy_timeout(sqlite_store: SessionStore) -> None:
    assert isinstance(sqlite_store, SqlSessionStore)
    async with sqlite_store.engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 30000


async def test_sqlite_concurrent_writers_from_two_stores_all_succeed(
    sqlite_store: SessionStore,
) -> None:
    """Writers on two engines queue on the write lock (BEGIN IMMEDIATE, busy timeout)
    instead of failing with "database is locked"."""
    await sqlite_store.create(record())
    other = twin(sqlite_store)
    await other.open()
    try:
        stores = [sqlite_store, other] * 10
        await asyncio.gather(
            *(
                s.add_action(proposed(f"act-{i:02d}", created_at=T0 + i))
                for i, s in enumerate(stores)
            ),
            *(
                s.append_messages("sess-1", i, [Message(Role.USER, f"m{i}")])
                for i, s in enumerate(stores)
            ),
        )
        got = await other.get("sess-1")
        assert got is not None
        assert [a.action_id for a in got.actions] == [f"act-{i:02d}" for i in range(20)]
        assert sorted(m.content for m in got.messages) == sorted(f"m{i}" for i in range(20))
    finally:
        await other.close()


# ---- fencing tokens and turn records ----------------------------------------------------------


async def test_each_acquisition_gets_a_larger_fencing_token(store: SessionStore) -> None:
    await store.create(record())
    first = await store.acquire_lease("sess-1", "a", 30)
    assert first > 0
    assert await store.acquire_lease("sess-1", "b", 30) == 0  # held: no token
    await store.release_lease("sess-1", "a")
    second = await store.acquire_lease("sess-1", "b", 30)
    assert second > first


async def test_a_stale_holders_writes_are_rejected_and_change_nothing(store: SessionStore) -> None:
    await store.create(record())
    stale = await store.acquire_lease("sess-1", "stalled-replica", 0.05)
    await store.append_messages("sess-1", 1, [Message(Role.USER, "mine")], token=stale)
    # The stalled holder's lease lapses and another turn takes the session.
    await asyncio.sleep(0.1)
    fresh = await store.acquire_lease("sess-1", "live-replica", 30)
    assert fresh > stale
    action = Action(
        action_id="act-fence",
        session_id="sess-1",
        tool="billing_refund",
        arguments_json="{}",
        summary="refund",
        amount_cents=100,
        currency="USD",
        state=ActionState.PENDING,
        turn_index=1,
        created_at=1.0,
        expires_at=2e9,
    )
    with pytest.raises(LeaseLost):
        await store.append_messages("sess-1", 1, [Message(Role.USER, "late")], token=stale)
    with pytest.raises(LeaseLost):
        await store.update_counters(
            "sess-1", turn_count=9, task_tool_calls=9, task_time_used_s=9.0, token=stale
        )
    with pytest.raises(LeaseLost):
        await store.add_action(action, token=stale)
    with pytest.raises(LeaseLost):
        await store.put_turn(TurnRecord("sess-1", "req-1", 1, "t1"), token=stale)
    with pytest.raises(LeaseLost):
        await store.discard_turn_messages("sess-1", 1, token=stale)
    assert not await store.renew_lease("sess-1", "stalled-replica", stale, 30)
    got = await store.get("sess-1")
    assert got is not None
    assert [m.content for m in got.messages] == ["mine"]
    assert got.turn_count == 0 and got.actions == []
    assert await store.get_turn("sess-1", "req-1") is None
    # The current holder writes fine, transitions included.
    await store.add_action(action, token=fresh)
    moved = await store.transition_action(
        "sess-1",
        "act-fence",
        expected=[ActionState.PENDING],
        new=dataclasses.replace(action, state=ActionState.REJECTED),
        token=fresh,
    )
    assert moved is not None and moved.state is ActionState.REJECTED
    with pytest.raises(LeaseLost):
        await store.transition_action(
            "sess-1",
            "act-fence",
            expected=[ActionState.REJECTED],
            new=dataclasses.replace(action, state=ActionState.EXPIRED),
            token=stale,
        )
    await store.update_counters(
        "sess-1", turn_count=1, task_tool_calls=0, task_time_used_s=0.5, token=fresh
    )


async def test_renewal_keeps_the_lease_and_a_lapsed_one_is_taken_back(store: SessionStore) -> None:
    await store.create(record())
    token = await store.acquire_lease("sess-1", "a", 0.05)
    assert await store.renew_lease("sess-1", "a", token, 30)
    await asyncio.sleep(0.1)  # past the first ttl: the renewal is what holds it now
    assert await store.acquire_lease("sess-1", "b", 30) == 0
    await store.release_lease("sess-1", "a")
    # Released and nobody took it: the same token renews (the heartbeat after a hiccup)...
    assert await store.renew_lease("sess-1", "a", token, 30)
    assert await store.acquire_lease("sess-1", "b", 30) == 0
    await store.release_lease("sess-1", "a")
    newer = await store.acquire_lease("sess-1", "b", 30)
    # ... but once another holder acquired, the old token never comes back.
    assert not await store.renew_lease("sess-1", "a", token, 30)
    assert newer > token


async def test_turn_records_round_trip_and_discard_drops_one_turns_messages(
    store: SessionStore,
) -> None:
    await store.create(record())
    token = await store.acquire_lease("sess-1", "a", 30)
    await store.append_messages("sess-1", 1, [Message(Role.USER, "one")], token=token)
    await store.append_messages("sess-1", 2, [Message(Role.USER, "two")], token=token)
    await store.append_messages("sess-1", 2, [Message(Role.ASSISTANT, "two-a")], token=token)
    await store.put_turn(TurnRecord("sess-1", "req-2", 2, "turn-2"), token=token)
    running = await store.get_turn("sess-1", "req-2")
    assert running is not None
    assert (running.turn_index, running.turn_id, running.finished) == (2, "turn-2", False)
    assert await store.discard_turn_messages("sess-1", 2, token=token) == 2
    done = TurnRecord("sess-1", "req-2", 2, "turn-2", finished=True, final_json='{"x":1}')
    await store.put_turn(done, token=token)
    again = await store.get_turn("sess-1", "req-2")
    assert again is not None and again.finished and again.final_json == '{"x":1}'
    assert await store.get_turn("sess-1", "req-other") is None
    got = await store.get("sess-1")
    assert got is not None and [m.content for m in got.messages] == ["one"]
    await store.append_messages("sess-1", 2, [Message(Role.USER, "two again")], token=token)
    got = await store.get("sess-1")
    assert got is not None and [m.content for m in got.messages] == ["one", "two again"]


async def test_get_reads_a_bounded_window_of_the_newest_messages(store: SessionStore) -> None:
    await store.create(record())
    said = [Message(Role.USER if i % 2 == 0 else Role.ASSISTANT, f"m{i}") for i in range(12)]
    for index in range(3):  # four messages a turn: the window spans turns
        await store.append_messages("sess-1", index + 1, said[index * 4 : index * 4 + 4])
    await store.update_counters("sess-1", turn_count=3, task_tool_calls=2, task_time_used_s=1.5)
    whole = await store.get("sess-1")
    assert whole is not None and whole.messages == said
    window = await store.get("sess-1", last_messages=5)
    assert window is not None
    assert window.messages == said[-5:]  # the newest five, oldest first
    assert dataclasses.replace(window, messages=said) == whole  # everything else is the same
    wide = await store.get("sess-1", last_messages=50)
    assert wide is not None and wide.messages == said
    none = await store.get("sess-1", last_messages=0)
    assert none is not None and none.messages == [] and none.turn_count == 3
    one = await store.get("sess-1", last_messages=1)
    assert one is not None and one.messages == said[-1:]
    assert await store.get("nope", last_messages=5) is None


async def test_the_window_follows_appends_and_discarded_turns(store: SessionStore) -> None:
    await store.create(record())
    await store.append_messages(
        "sess-1", 1, [Message(Role.USER, "a"), Message(Role.ASSISTANT, "b")]
    )
    await store.append_messages(
        "sess-1", 2, [Message(Role.USER, "c"), Message(Role.ASSISTANT, "d")]
    )
    token = await store.acquire_lease("sess-1", "owner", 30)
    assert await store.discard_turn_messages("sess-1", 2, token=token) == 2
    window = await store.get("sess-1", last_messages=3)
    assert window is not None
    assert [m.content for m in window.messages] == ["a", "b"]
    await store.append_messages("sess-1", 2, [Message(Role.USER, "e")], token=token)
    window = await store.get("sess-1", last_messages=2)
    assert window is not None
    assert [m.content for m in window.messages] == ["b", "e"]


def _url_and_prefix(store: SessionStore) -> tuple[str, str]:
    """What an orchestrator needs to open ``store``'s backend under its prefix."""
    if isinstance(store, SqlSessionStore):
        url = store.engine.url.render_as_string(hide_password=False)
        return url, store.sessions.name.removesuffix("sessions")
    assert isinstance(store, RedisSessionStore)
    return REDIS_URL, store._prefix


def _users_prompted(inference: FakeInferenceServicer) -> list[str]:
    """The user messages of the last answer prompt the model was sent."""
    prompt = inference.of_kind("answer")[-1].messages
    return [m.content for m in prompt if m.role == common_pb2.ROLE_USER]


async def test_a_turn_loads_only_its_window_and_get_session_returns_everything(
    store: SessionStore,
) -> None:
    url, prefix = _url_and_prefix(store)
    inference_server, inference = await start_fake("inference")
    tools_server, tools = await start_fake("tools")
    mesh = Mesh(inference, tools, inference_server.address, tools_server.address, url, prefix, [])
    try:
        first = await mesh.orchestrator()
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
            session = await create(stub)
            sid = session.session_id
            await turn(stub, sid, "turn one")
            one = await stub.GetSession(pb.GetSessionRequest(session_id=sid))
            per_turn = len(one.session.messages)
            await turn(stub, sid, "turn two")
            assert _users_prompted(inference) == ["turn one", "turn two"]  # the default window
        # A replica whose window holds exactly one turn's messages.
        windowed = await mesh.orchestrator(history_window_messages=per_turn)
        async with grpc.aio.insecure_channel(windowed.address) as channel:
            stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
            await turn(stub, sid, "turn three")
            # Turn one fell outside the window; the prompt budgeter saw only turn two.
            assert _users_prompted(inference) == ["turn two", "turn three"]
            stored = await stub.GetSession(pb.GetSessionRequest(session_id=sid))
            users = [m.content for m in stored.session.messages if m.role == common_pb2.ROLE_USER]
            assert users == ["turn one", "turn two", "turn three"]
            assert len(stored.session.messages) == 3 * per_turn
        # A window holding only the tail of a turn (its answer) shows no history at all.
        tail_only = await mesh.orchestrator(history_window_messages=1)
        async with grpc.aio.insecure_channel(tail_only.address) as channel:
            stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
            await turn(stub, sid, "turn four")
            assert _users_prompted(inference) == ["turn four"]
    finally:
        for server in [*mesh.servers, inference_server, tools_server]:
            await server.stop(grace=0.5)


async def test_finished_tool_calls_are_recorded_per_turn_and_fenced(store: SessionStore) -> None:
    await store.create(record())
    token = await store.acquire_lease("sess-1", "a", 30)
    assert await store.tool_results("sess-1", "r-1") == {}
    await store.record_tool_results("sess-1", "r-1", {"k1": '{"x":1}'}, token=token)
    await store.record_tool_results(
        "sess-1", "r-1", {"k2": '{"x":2}', "k1": '{"x":1}'}, token=token
    )
    await store.record_tool_results("sess-1", "r-2", {"k1": '{"y":1}'}, token=token)
    assert await store.tool_results("sess-1", "r-1") == {"k1": '{"x":1}', "k2": '{"x":2}'}
    assert await store.tool_results("sess-1", "r-2") == {"k1": '{"y":1}'}
    other = await twin_reader(store)
    try:  # durable: another replica reads them
        assert await other.tool_results("sess-1", "r-1") == {"k1": '{"x":1}', "k2": '{"x":2}'}
    finally:
        await other.close()
    await store.release_lease("sess-1", "a")
    newer = await store.acquire_lease("sess-1", "b", 30)
    assert newer > token
    with pytest.raises(LeaseLost):
        await store.record_tool_results("sess-1", "r-1", {"k3": "{}"}, token=token)
    assert await store.tool_results("sess-1", "r-1") == {"k1": '{"x":1}', "k2": '{"x":2}'}


async def twin_reader(store: SessionStore) -> SessionStore:
    other = twin(store)
    await other.open()
    return other
