"""The session stores (SQLite, PostgreSQL, Redis) against the same contract."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Message, Role, ToolCall
from services.orchestrator.sessions.base import SessionRecord, SessionState, SessionStore
from services.orchestrator.sessions.factory import store_from_url
from services.orchestrator.sessions.redis_store import RedisSessionStore
from services.orchestrator.sessions.sql import SqlSessionStore
from shared.errors import AlreadyExists
from tests.orchestrator.conftest import close_store, open_store


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
    if isinstance(store, SqlSessionStore):
        other: SessionStore = SqlSessionStore(
            str(store.engine.url.render_as_string(hide_password=False)),
            table_prefix=store.sessions.name.removesuffix("sessions"),
        )
    else:
        assert isinstance(store, RedisSessionStore)
        other = RedisSessionStore("redis://127.0.0.1:6379/5", key_prefix=store._prefix)
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
