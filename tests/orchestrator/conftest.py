"""Fixtures of the orchestrator tests: session stores on every backend (isolated per run)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.orchestrator.sessions.base import SessionStore
from services.orchestrator.sessions.redis_store import RedisSessionStore
from services.orchestrator.sessions.sql import SqlSessionStore

POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/5"


def unique_prefix() -> str:
    return f"amtest_{uuid.uuid4().hex[:10]}_"


async def open_store(kind: str, tmp_path: Path) -> SessionStore:
    store: SessionStore
    if kind == "sqlite":
        store = SqlSessionStore(f"sqlite+aiosqlite:///{tmp_path / 'sessions.sqlite'}")
    elif kind == "postgres":
        store = SqlSessionStore(POSTGRES_URL, table_prefix=unique_prefix())
    else:
        store = RedisSessionStore(REDIS_URL, key_prefix=unique_prefix().rstrip("_") + ":")
    await store.open()
    return store


async def close_store(store: SessionStore) -> None:
    if isinstance(store, SqlSessionStore) and store.engine.url.get_backend_name() != "sqlite":
        await store.drop_tables()
    if isinstance(store, RedisSessionStore):
        await store.drop_keys()
    await store.close()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    opened = await open_store(request.param, tmp_path)
    try:
        yield opened
    finally:
        await close_store(opened)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SessionStore]:
    opened = await open_store("sqlite", tmp_path)
    try:
        yield opened
    finally:
        await close_store(opened)
