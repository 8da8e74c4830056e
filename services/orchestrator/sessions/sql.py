"""SessionStore on SQLAlchemy async: an SQLite file embedded, PostgreSQL in production.

Tables are named with a prefix so several deployments (or test runs) can share a database.
The turn lease is a conditional UPDATE on the session row, and an action's transition a
conditional UPDATE on its row (compare-and-set on the state), atomic in both databases and so
across replicas.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Action, ActionState, Message
from services.orchestrator.sessions.action_rules import check_replacement
from services.orchestrator.sessions.base import SessionRecord, SessionState
from services.orchestrator.sessions.sql_schema import (
    action_from_row,
    action_values,
    session_tables,
)
from shared.errors import AlreadyExists, NotFound
from shared.sqlite import create_sqlite_engine, is_sqlite_url, writer


class SqlSessionStore:
    """Sessions, their messages and their proposed actions in three tables.

    Every write runs in a write transaction (``BEGIN IMMEDIATE`` on SQLite, whose
    connections also get WAL and a busy timeout: see :mod:`shared.sqlite`).
    """

    def __init__(self, url: str, *, table_prefix: str = "agentmesh_") -> None:
        self._url = url
        self._engine: AsyncEngine | None = None
        self._writer: AsyncEngine | None = None
        tables = session_tables(table_prefix)
        self._meta = tables.meta
        self.sessions = tables.sessions
        self.messages = tables.messages
        self.actions = tables.actions

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the session store is not open")
        return self._engine

    @property
    def _write(self) -> AsyncEngine:
        if self._writer is None:
            raise RuntimeError("the session store is not open")
        return self._writer

    async def open(self) -> None:
        if is_sqlite_url(self._url):
            self._engine = create_sqlite_engine(self._url)
        else:
            self._engine = create_async_engine(self._url, pool_pre_ping=True)
        self._writer = writer(self._engine)
        try:
            async with self._writer.begin() as conn:
                await conn.run_sync(self._meta.create_all)
        except IntegrityError:
            # Another replica created them at the same moment (PostgreSQL catalog race).
            pass

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
            self._writer = None

    async def drop_tables(self) -> None:
        """Removes this store's tables (tests isolate runs by prefix and clean up)."""
        async with self._write.begin() as conn:
            await conn.run_sync(self._meta.drop_all)

    async def create(self, record: SessionRecord) -> None:
        try:
            await self._insert(record)
        except IntegrityError as exc:
            raise AlreadyExists(
                "a session with this id exists", metadata={"session_id": record.session_id}
            ) from exc

    async def _insert(self, record: SessionRecord) -> None:
        async with self._write.begin() as conn:
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
            actions = await self._actions_of(conn, session_id)
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
            actions=actions,
        )

    async def _actions_of(self, conn: AsyncConnection, session_id: str) -> list[Action]:
        """The session's actions, oldest first (insertion order breaks created_at ties)."""
        c = self.actions.c
        rows = (
            await conn.execute(
                select(self.actions).where(c.session_id == session_id).order_by(c.created_at, c.seq)
            )
        ).all()
        return [action_from_row(r) for r in rows]

    async def append_messages(
        self, session_id: str, turn_index: int, messages: Sequence[Message]
    ) -> None:
        if not messages:
            return
        now = time.time()
        async with self._write.begin() as conn:
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
        async with self._write.begin() as conn:
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
        async with self._write.begin() as conn:
            result = await conn.execute(
                update(self.sessions)
                .where(self.sessions.c.session_id == session_id)
                .values(state=SessionState.ENDED.value, updated_at=time.time())
            )
        return bool(result.rowcount)

    async def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> bool:
        now = time.time()
        c = self.sessions.c
        async with self._write.begin() as conn:
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
        async with self._write.begin() as conn:
            await conn.execute(
                update(self.sessions)
                .where(and_(c.session_id == session_id, c.lease_owner == owner))
                .values(lease_owner=None, lease_expires_at=None)
            )

    async def add_action(self, action: Action) -> None:
        try:
            async with self._write.begin() as conn:
                known = (
                    await conn.execute(
                        select(self.sessions.c.session_id).where(
                            self.sessions.c.session_id == action.session_id
                        )
                    )
                ).first()
                if known is None:
                    raise NotFound(
                        "no session with this id", metadata={"session_id": action.session_id}
                    )
                await conn.execute(insert(self.actions).values(**action_values(action)))
        except IntegrityError as exc:
            raise AlreadyExists(
                "an action with this id exists", metadata={"action_id": action.action_id}
            ) from exc

    async def get_action(self, session_id: str, action_id: str) -> Action | None:
        async with self.engine.connect() as conn:
            return await self._action(conn, session_id, action_id)

    async def _action(
        self, conn: AsyncConnection, session_id: str, action_id: str
    ) -> Action | None:
        c = self.actions.c
        row = (
            await conn.execute(
                select(self.actions).where(
                    and_(c.session_id == session_id, c.action_id == action_id)
                )
            )
        ).first()
        return None if row is None else action_from_row(row)

    async def transition_action(
        self,
        session_id: str,
        action_id: str,
        *,
        expected: Sequence[ActionState],
        new: Action,
    ) -> Action | None:
        check_replacement(session_id, action_id, new)
        c = self.actions.c
        async with self._write.begin() as conn:
            if expected:
                # The WHERE on state is the compare-and-set: a concurrent writer that got
                # there first has changed the state, so this UPDATE matches no row
                # (PostgreSQL re-checks the WHERE after waiting for the row lock; SQLite
                # write transactions are serialised by BEGIN IMMEDIATE).
                await conn.execute(
                    update(self.actions)
                    .where(
                        and_(
                            c.session_id == session_id,
                            c.action_id == action_id,
                            c.state.in_([state.value for state in expected]),
                        )
                    )
                    .values(**action_values(new))
                )
            return await self._action(conn, session_id, action_id)
