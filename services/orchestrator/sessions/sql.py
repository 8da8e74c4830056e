"""SessionStore on SQLAlchemy async: an SQLite file embedded, PostgreSQL in production.

Tables are named with a prefix so several deployments (or test runs) can share a database.
The turn lease is a conditional UPDATE on the session row, and an action's transition a
conditional UPDATE on its row (compare-and-set on the state), atomic in both databases and so
across replicas.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import and_, delete, func, insert, inspect, or_, select, text, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from services.orchestrator.loop.types import Action, ActionState, Message
from services.orchestrator.sessions.action_rules import check_replacement
from services.orchestrator.sessions.base import (
    UNFENCED,
    LeaseLost,
    SessionRecord,
    SessionState,
    TurnRecord,
)
from services.orchestrator.sessions.record_codec import session_fields, session_from_fields
from services.orchestrator.sessions.sql_schema import (
    action_from_row,
    action_values,
    session_tables,
)
from shared.errors import AlreadyExists, NotFound, Unavailable
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
        self.turns = tables.turns
        self.finished_calls = tables.tool_results

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

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; a database that cannot be reached is UNAVAILABLE."""
        with _reachable():
            async with self._write.begin() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncConnection]:
        with _reachable():
            async with self.engine.connect() as conn:
                yield conn

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
        async with self._writer.begin() as conn:
            await conn.run_sync(self._add_lease_token)

    def _add_lease_token(self, sync_conn: Any) -> None:
        """Sessions tables made before fencing lack ``lease_token``: add it in place."""
        columns = {c["name"] for c in inspect(sync_conn).get_columns(self.sessions.name)}
        if "lease_token" not in columns:
            sync_conn.execute(
                text(
                    f"ALTER TABLE {self.sessions.name} "
                    "ADD COLUMN lease_token BIGINT NOT NULL DEFAULT 0"
                )
            )

    async def _fence(
        self, conn: AsyncConnection, session_id: str, token: int, **values: Any
    ) -> None:
        """Inside a write transaction: LeaseLost unless ``token`` is the session's current
        one, and the session row updated with ``values`` (and ``updated_at``) in the same
        statement. The UPDATE takes the row's lock (PostgreSQL; SQLite's BEGIN IMMEDIATE
        already serialises writers), so no acquisition can slip in before this transaction
        commits. Unfenced, only a write that has ``values`` touches the row."""
        c = self.sessions.c
        if token == UNFENCED:
            if values:
                await conn.execute(
                    update(self.sessions)
                    .where(c.session_id == session_id)
                    .values({"updated_at": time.time(), **values})
                )
            return
        result = await conn.execute(
            update(self.sessions)
            .where(and_(c.session_id == session_id, c.lease_token == token))
            .values({"updated_at": time.time(), **values})
        )
        if not result.rowcount:
            raise LeaseLost(session_id)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
            self._writer = None

    async def drop_tables(self) -> None:
        """Removes this store's tables (tests isolate runs by prefix and clean up)."""
        async with self._writing() as conn:
            await conn.run_sync(self._meta.drop_all)

    async def create(self, record: SessionRecord) -> None:
        try:
            await self._insert(record)
        except IntegrityError as exc:
            raise AlreadyExists(
                "a session with this id exists", metadata={"session_id": record.session_id}
            ) from exc

    async def _insert(self, record: SessionRecord) -> None:
        async with self._writing() as conn:
            await conn.execute(
                insert(self.sessions).values(session_id=record.session_id, **session_fields(record))
            )

    async def get(
        self, session_id: str, *, last_messages: int | None = None
    ) -> SessionRecord | None:
        async with self._reading() as conn:
            row = (
                await conn.execute(
                    select(self.sessions).where(self.sessions.c.session_id == session_id)
                )
            ).first()
            if row is None:
                return None
            query = select(self.messages.c.data_json).where(
                self.messages.c.session_id == session_id
            )
            if last_messages is None:
                rows = list((await conn.execute(query.order_by(self.messages.c.seq))).all())
            else:  # the newest window, read newest first and put back in order
                newest = query.order_by(self.messages.c.seq.desc()).limit(max(last_messages, 0))
                rows = list(reversed((await conn.execute(newest)).all()))
            actions = await self._actions_of(conn, session_id)
        return session_from_fields(
            row.session_id,
            dict(row._mapping),
            [Message.from_dict(json.loads(r.data_json)) for r in rows],
            actions,
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
        self,
        session_id: str,
        turn_index: int,
        messages: Sequence[Message],
        *,
        token: int = UNFENCED,
    ) -> None:
        if not messages:
            return
        now = time.time()
        async with self._writing() as conn:
            await self._fence(conn, session_id, token, updated_at=now)
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

    async def update_counters(
        self,
        session_id: str,
        *,
        turn_count: int,
        task_tool_calls: int,
        task_time_used_s: float,
        token: int = UNFENCED,
    ) -> None:
        async with self._writing() as conn:
            await self._fence(
                conn,
                session_id,
                token,
                turn_count=turn_count,
                task_tool_calls=task_tool_calls,
                task_time_used_s=task_time_used_s,
            )

    async def end(self, session_id: str) -> bool:
        async with self._writing() as conn:
            result = await conn.execute(
                update(self.sessions)
                .where(self.sessions.c.session_id == session_id)
                .values(state=SessionState.ENDED.value, updated_at=time.time())
            )
        return bool(result.rowcount)

    async def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> int:
        now = time.time()
        c = self.sessions.c
        async with self._writing() as conn:
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
                .values(
                    lease_owner=owner,
                    lease_expires_at=now + ttl_s,
                    lease_token=c.lease_token + 1,
                )
            )
            if not result.rowcount:
                return 0
            token = (
                await conn.execute(select(c.lease_token).where(c.session_id == session_id))
            ).scalar_one()
        return int(token)

    async def renew_lease(self, session_id: str, owner: str, token: int, ttl_s: float) -> bool:
        c = self.sessions.c
        async with self._writing() as conn:
            result = await conn.execute(
                update(self.sessions)
                .where(
                    and_(
                        c.session_id == session_id,
                        c.lease_token == token,
                        or_(c.lease_owner == owner, c.lease_owner.is_(None)),
                    )
                )
                .values(lease_owner=owner, lease_expires_at=time.time() + ttl_s)
            )
        return bool(result.rowcount)

    async def release_lease(self, session_id: str, owner: str) -> None:
        c = self.sessions.c
        async with self._writing() as conn:
            await conn.execute(
                update(self.sessions)
                .where(and_(c.session_id == session_id, c.lease_owner == owner))
                .values(lease_owner=None, lease_expires_at=None)
            )

    async def add_action(self, action: Action, *, token: int = UNFENCED) -> None:
        try:
            async with self._writing() as conn:
                await self._fence(conn, action.session_id, token)
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
        async with self._reading() as conn:
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
        token: int = UNFENCED,
    ) -> Action | None:
        check_replacement(session_id, action_id, new)
        c = self.actions.c
        async with self._writing() as conn:
            await self._fence(conn, session_id, token)
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

    async def get_turn(self, session_id: str, request_id: str) -> TurnRecord | None:
        c = self.turns.c
        async with self._reading() as conn:
            row = (
                await conn.execute(
                    select(self.turns).where(
                        and_(c.session_id == session_id, c.request_id == request_id)
                    )
                )
            ).first()
        if row is None:
            return None
        return TurnRecord(
            session_id=row.session_id,
            request_id=row.request_id,
            turn_index=int(row.turn_index),
            turn_id=row.turn_id,
            finished=bool(row.finished),
            final_json=row.final_json,
            updated_at=float(row.updated_at),
        )

    async def put_turn(self, turn: TurnRecord, *, token: int) -> None:
        c = self.turns.c
        async with self._writing() as conn:
            await self._fence(conn, turn.session_id, token)
            await conn.execute(
                delete(self.turns).where(
                    and_(c.session_id == turn.session_id, c.request_id == turn.request_id)
                )
            )
            await conn.execute(
                insert(self.turns).values(
                    session_id=turn.session_id,
                    request_id=turn.request_id,
                    turn_index=turn.turn_index,
                    turn_id=turn.turn_id,
                    finished=int(turn.finished),
                    final_json=turn.final_json,
                    updated_at=time.time(),
                )
            )

    async def record_tool_results(
        self, session_id: str, request_id: str, results: Mapping[str, str], *, token: int
    ) -> None:
        if not results:
            return
        c = self.finished_calls.c
        async with self._writing() as conn:
            await self._fence(conn, session_id, token)
            await conn.execute(
                delete(self.finished_calls).where(
                    and_(
                        c.session_id == session_id,
                        c.request_id == request_id,
                        c.call_key.in_(list(results)),
                    )
                )
            )
            await conn.execute(
                insert(self.finished_calls),
                [
                    {
                        "session_id": session_id,
                        "request_id": request_id,
                        "call_key": key,
                        "outcome_json": outcome,
                    }
                    for key, outcome in results.items()
                ],
            )

    async def tool_results(self, session_id: str, request_id: str) -> dict[str, str]:
        c = self.finished_calls.c
        async with self._reading() as conn:
            rows = (
                await conn.execute(
                    select(c.call_key, c.outcome_json).where(
                        and_(c.session_id == session_id, c.request_id == request_id)
                    )
                )
            ).all()
        return {r.call_key: r.outcome_json for r in rows}

    async def discard_turn_messages(self, session_id: str, turn_index: int, *, token: int) -> int:
        c = self.messages.c
        async with self._writing() as conn:
            await self._fence(conn, session_id, token)
            result = await conn.execute(
                delete(self.messages).where(
                    and_(c.session_id == session_id, c.turn_index == turn_index)
                )
            )
        return int(result.rowcount or 0)


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    """Connection-level failures (refused, reset, timed out, the server gone) become
    UNAVAILABLE: nothing was committed, the caller may retry; the pool re-pings on the next
    checkout, so the store recovers by itself when the database is back."""
    try:
        yield
    except (OperationalError, InterfaceError, OSError, TimeoutError) as exc:
        raise Unavailable(
            "the session store cannot be reached; retry", reason="SESSION_STORE_UNAVAILABLE"
        ) from exc
