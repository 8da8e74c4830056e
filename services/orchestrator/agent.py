"""Sessions + turns, without gRPC: validation, the store's turn lease, persistence of every
completed step, and the task-level counters. The servicer is a thin mapping over this."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from typing import Any

from services.orchestrator.loop.events import MessagesCommitted, TurnEvent
from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.ports import ToolsPort
from services.orchestrator.loop.runner import TurnInput, TurnRunner
from services.orchestrator.loop.types import ToolDef
from services.orchestrator.sessions.base import SessionRecord, SessionState, SessionStore
from shared.deadlines import Deadline
from shared.errors import AgentmeshError, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("agentmesh.orchestrator")

MAX_USER_MESSAGE_CHARS = 16_000
MAX_SESSION_ID_CHARS = 64


class Agent:
    """The agent as an application: create/get/end sessions and run turns."""

    def __init__(
        self,
        store: SessionStore,
        runner: TurnRunner,
        tools: ToolsPort,
        default_caps: Caps,
        *,
        lease_margin_s: float = 30.0,
        registry_timeout_s: float = 10.0,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._store = store
        self._runner = runner
        self._tools = tools
        self._default_caps = default_caps
        self._lease_margin_s = lease_margin_s
        self._registry_timeout_s = registry_timeout_s
        self._new_id = new_id
        self._registry: tuple[ToolDef, ...] | None = None
        self._registry_lock = asyncio.Lock()

    @property
    def default_caps(self) -> Caps:
        return self._default_caps

    async def registry(self) -> tuple[ToolDef, ...]:
        """The tools service's registry, read once: it is immutable per deployment."""
        if self._registry is not None:
            return self._registry
        async with self._registry_lock:
            if self._registry is None:
                tools = await self._tools.list_tools(timeout_s=self._registry_timeout_s)
                self._registry = tuple(tools)
        return self._registry

    # ------------------------------------------------------------------ sessions

    async def create_session(
        self,
        customer_id: str = "",
        caps_overrides: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        session_id: str = "",
    ) -> SessionRecord:
        if session_id and not _CLIENT_SESSION_ID.fullmatch(session_id):
            raise InvalidArgument(
                "session_id", "use 1-64 letters, digits, '-' or '_' (or leave it empty)"
            )
        if len(customer_id) > 128:
            raise InvalidArgument("customer_id", "longer than 128 characters")
        overrides = {k: v for k, v in (caps_overrides or {}).items() if v}
        try:
            caps = Caps.model_validate({**self._default_caps.model_dump(), **overrides})
        except ValueError as exc:
            raise InvalidArgument("budget", "caps must be positive numbers") from exc
        record = SessionRecord(
            session_id=session_id or self._new_id(),
            caps=caps,
            customer_id=customer_id,
            metadata=dict(metadata or {}),
        )
        await self._store.create(record)
        return record

    async def get_session(self, session_id: str) -> SessionRecord:
        _check_session_id(session_id)
        record = await self._store.get(session_id)
        if record is None:
            raise NotFound("no such session", metadata={"session_id": session_id})
        return record

    async def end_session(self, session_id: str) -> SessionRecord:
        _check_session_id(session_id)
        if not await self._store.end(session_id):
            raise NotFound("no such session", metadata={"session_id": session_id})
        return await self.get_session(session_id)

    # ------------------------------------------------------------------ turns

    async def run_turn(
        self,
        session_id: str,
        user_message: str,
        *,
        lane: str = "",
        deadline: Deadline | None = None,
    ) -> AsyncGenerator[TurnEvent, None]:
        """Runs one turn under the session's lease; persists each completed step as it
        happens and the counters (tool calls, time used) whatever way the turn ends."""
        _check_session_id(session_id)
        if not user_message.strip():
            raise InvalidArgument("user_message", "must not be empty")
        if len(user_message) > MAX_USER_MESSAGE_CHARS:
            raise InvalidArgument(
                "user_message", f"longer than {MAX_USER_MESSAGE_CHARS} characters"
            )
        record = await self.get_session(session_id)
        _check_active(record)
        owner = self._new_id()
        ttl = record.caps.turn_budget_s + self._lease_margin_s
        if not await self._store.acquire_lease(session_id, owner, ttl):
            raise FailedPrecondition(
                "a turn is already in flight for this session",
                reason="TURN_IN_FLIGHT",
                metadata={"session_id": session_id},
            )
        started = time.monotonic()
        counters = _Counters()
        try:
            record = await self.get_session(session_id)  # fresh: another replica may have run
            _check_active(record)
            try:
                registry = await self.registry()
            except AgentmeshError:
                log.warning("tool registry unavailable; the turn runs without tools")
                registry = ()
            counters.turn_count = record.turn_count + 1
            counters.task_tool_calls = record.task_tool_calls
            counters.base_time = record.task_time_used_s
            await self._store.update_counters(
                session_id,
                turn_count=counters.turn_count,
                task_tool_calls=counters.task_tool_calls,
                task_time_used_s=counters.base_time,
            )
            counters.dirty = True
            inp = TurnInput(
                session_id=session_id,
                turn_index=counters.turn_count,
                history=tuple(record.messages),
                user_message=user_message,
                registry=registry,
                caps=record.caps,
                customer_id=record.customer_id,
                task_tool_calls=record.task_tool_calls,
                task_time_used_s=record.task_time_used_s,
                forced_lane=lane,
                deadline=deadline,
            )
            async with aclosing(self._runner.run(inp)) as events:
                async for event in events:
                    if isinstance(event, MessagesCommitted):
                        await self._store.append_messages(
                            session_id, counters.turn_count, event.messages
                        )
                        if event.tool_calls_executed:
                            counters.task_tool_calls += event.tool_calls_executed
                            await self._save(session_id, counters, started)
                    yield event
        finally:
            await _shielded(self._finish(session_id, owner, counters, started))

    async def _save(self, session_id: str, counters: _Counters, started: float) -> None:
        await self._store.update_counters(
            session_id,
            turn_count=counters.turn_count,
            task_tool_calls=counters.task_tool_calls,
            task_time_used_s=counters.base_time + (time.monotonic() - started),
        )

    async def _finish(
        self, session_id: str, owner: str, counters: _Counters, started: float
    ) -> None:
        try:
            if counters.dirty:
                await self._save(session_id, counters, started)
        finally:
            await self._store.release_lease(session_id, owner)


class _Counters:
    def __init__(self) -> None:
        self.turn_count = 0
        self.task_tool_calls = 0
        self.base_time = 0.0
        self.dirty = False


async def _shielded(coro: Any) -> None:
    """Cleanup that must finish even when the turn was cancelled (client disconnect)."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise
    except Exception:
        log.exception("could not finish the turn's bookkeeping")


_CLIENT_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("session_id", "must not be empty")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidArgument("session_id", f"longer than {MAX_SESSION_ID_CHARS} characters")


def _check_active(record: SessionRecord) -> None:
    if record.state is SessionState.ENDED:
        raise FailedPrecondition(
            "the session has ended",
            reason="SESSION_ENDED",
            metadata={"session_id": record.session_id},
        )
