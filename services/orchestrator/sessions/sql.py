"""SessionStore on SQLAlchemy async: an SQLite file embedded, PostgreSQL in production.

Tables are named with a prefix so several deployments (or test runs) can share a database.
The turn lease is a conditional UPDATE on the session row, atomic in both databases.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Message
from services.orchestrator.sessions.base import SessionRecord, SessionState
from shared.errors import AlreadyExists


class SqlSessionStore:
    """Sessions and their messages in two tables."""

    def __init__(self, url: str, *, table_prefix: str = "agentmesh_") -> None:
        self._url = url
        self._engine: AsyncEngine | None = None
        self._meta = MetaData()
        self.sessions = Table(
            f"{table_prefix}sessions",
            self._meta,
            Column("session_id", String(64), primary_key=True),
            Column("state", String(16), nullable=False),
            Column("customer_id", String(128), nullable=False, default=""),
            Column("caps_json", Text, nullable=False),
            Column("turn_count", Integer, nullable=False, default=0),
            Column("task_tool_calls", Integer, nullable=False, default=0),
            Column("task_time_used_s", Float, nullable=False, default=0.0),
            Column("created_at", Float, nullable=False),
            Column("updated_at", Float, nullable=False),
            Column("metadata_json", Text, nullable=False, default="{}"),
            Column("lease_owner", String(64), nullable=True),
            Column("lease_expires_at", Float, nullable=True),
        )
        self.messages = Table(
            f"{table_prefix}messages",
            self._meta,
            Column("session_id", String(64), nullable=False),
            Column("seq", Integer, nullable=False),
            Column("turn_index", Integer, nullable=False),
            Column("data_json", Text, nullable=False),
            Column("created_at", Float, nullable=False),
            PrimaryKeyConstraint("session_id", "seq"),
        )

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the session store is not open")
        return self._engine

    async def open(self) -> None:
        url = make_url(self._url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        self._engine = create_async_engine(self._url, pool_pre_ping=True)
        async with self._engine.begin() as conn:
            await conn.run_sync(self._meta.create_all)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def drop_tables(self) -> None:
        """Removes this store's tables (tests isolate runs by prefix and clean up)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self._meta.drop_all)

    async def create(self, record: SessionRecord) -> None:
        try:
            await self._insert(record)
        except IntegrityError as exc:
            raise AlreadyExists(
                "a session with this id exists", metadata={"session_id": record.session_id}
            ) from exc

    async def _insert(self, record: SessionRecord) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(self.sessions).values(
                    session_id=record.session_id,
                    state=record.state.value,
                    customer_id=record.customer_id,
                    caps_json=record.caps.model_dump_json(),
                    turn_count=record.turn_count,
                    task_tool_calls=record.task_tool_calls,
                    task_time_used_s=record.task_time_used_s,
                    created_at=record.created_at,
                    updated_at=record.updated_at,
                    metadata_json=json.dumps(record.metadata, sort_keys=True),
                )
            )

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(self.sessions).where(self.sessions.c.session_id == session_id)
                )
            ).first()
            if row is None:
                return None
            rows = (
                await conn.execute(
                    select(self.messages.c.data_json)
                    .where(self.messages.c.session_id == session_id)
                    .order_by(self.messages.c.seq)
                )
            ).all()
        return SessionRecord(
            session_id=row.session_id,
            caps=Caps.model_validate_json(row.caps_json),
            customer_id=row.customer_id,
            state=SessionState(row.state),
            turn_count=row.turn_count,
            task_tool_calls=row.task_tool_calls,
            task_time_used_s=row.task_time_used_s,
            created_at=row.created_at,
            updated_at=row.updated_at,
            metadata=json.loads(row.metadata_json),
            messages=[Message.from_dict(json.loads(r.data_json)) for r in rows],
        )

    async def append_messages(
        self, session_id: str, turn_index: int, messages: Sequence[Message]
    ) -> None:
        if not messages:
            return
        now = time.time()
        async with self.engine.begin() as conn:
            last = (
                await conn.execute(
                    select(func.max(self.messages.c.seq)).where(
                        self.messages.c.session_id == session_id
                    )
                )
            ).scalar()
            start = (last if last is not None else -1) + 1
            await conn.execute(
                insert(self.messages),
                [
                    {
                        "session_id": session_id,
                        "seq": start + i,
                        "turn_index": turn_index,
                        "data_json": json.dumps(m.to_dict(), separators=(",", ":")),
                        "created_at": now,
                    }
                    for i, m in enumerate(messages)
                ],
            )
            await conn.execute(
                update(self.sessions)
                .where(self.sessions.c.session_id == session_id)
                .values(updated_at=now)
            )

    async def update_counters(
        self,
        session_id: str,
        *,
        turn_count: int,
        task_tool_calls: int,
        task_time_used_s: float,
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(self.sessions)
                .where(self.sessions.c.session_id == session_id)
                .values(
                    turn_count=turn_count,
                    task_tool_calls=task_tool_calls,
                    task_time_used_s=task_time_used_s,
                    updated_at=time.time(),
                )
            )

    async def end(self, session_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(self.sessions)
                .where(self.sessions.c.session_id == session_id)
                .values(state=SessionState.ENDED.value, updated_at=time.time())
            )
        return bool(result.rowcount)

    async def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> bool:
        now = time.time()
        c = self.sessions.c
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(self.sessions)
                .where(
                    and_(
                        c.session_id == session_id,
                        or_(
                            c.lease_owner.is_(None),
                            c.lease_expires_at < now,
                            c.lease_owner == owner,
                        ),
                    )
                )
                .values(lease_owner=owner, lease_expires_at=now + ttl_s)
            )
        return bool(result.rowcount)

    async def release_lease(self, session_id: str, owner: str) -> None:
        c = self.sessions.c
        async with self.engine.begin() as conn:
            await conn.execute(
                update(self.sessions)
                .where(and_(c.session_id == session_id, c.lease_owner == owner))
                .values(lease_owner=None, lease_expires_at=None)
            )
