"""Chooses the session store from its URL (configuration picks the backend)."""

from __future__ import annotations

from services.orchestrator.sessions.base import SessionStore
from services.orchestrator.sessions.redis_store import RedisSessionStore
from services.orchestrator.sessions.sql import SqlSessionStore


def store_from_url(url: str, *, prefix: str = "agentmesh_") -> SessionStore:
    """``sqlite+aiosqlite:///path``, ``postgresql+asyncpg://...`` or ``redis://host/db``."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisSessionStore(url, key_prefix=prefix.rstrip("_:") + ":")
    if url.startswith(("sqlite", "postgresql", "postgres")):
        return SqlSessionStore(url, table_prefix=prefix)
    raise ValueError(f"unsupported session store URL scheme: {url.split(':', 1)[0]!r}")
