"""SQLite engines that are safe under concurrent writers (shared by every SQL-backed store).

Every connection gets WAL journal mode (readers never wait for the writer) and a busy timeout
(a writer waits for the lock instead of failing at once). Transactions opened through
:func:`writer` start with ``BEGIN IMMEDIATE``: they take the write lock up front, so two
writers queue up instead of deadlocking when both try to upgrade a read lock (which SQLite
answers with SQLITE_BUSY at once, busy timeout or not). Other transactions use a plain
``BEGIN``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

WRITE_OPTION = "agentmesh_write"


def is_sqlite_url(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_sqlite_engine(
    url: str, *, foreign_keys: bool = True, busy_timeout_s: float = 30.0
) -> AsyncEngine:
    """An async SQLite engine (the database file's folder is created if missing)."""
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": busy_timeout_s})
    busy_ms = max(0, int(busy_timeout_s * 1000))

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The driver must not open transactions by itself: the "begin" hook below does.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def writer(engine: AsyncEngine) -> AsyncEngine:
    """The same engine (same pool), marked so that its transactions are write transactions
    (``BEGIN IMMEDIATE`` on SQLite; no effect on other databases)."""
    return engine.execution_options(**{WRITE_OPTION: True})
