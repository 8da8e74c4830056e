"""Sessions + turns, without gRPC: validation, the store's turn lease, persistence of every
completed step, and the task-level counters. The servicer is a thin mapping over this."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from typing import Any

from services.orchestrator.loop.actions import Limits
from services.orchestrator.loop.events import (
    ActionProposed,
    ActionResolved,
    MessagesCommitted,
    Outcome,
    TurnCompleted,
    TurnEvent,
    TurnStarted,
)
from services.orchestrator.loop.policy import Caps, Ceilings
from services.orchestrator.loop.ports import ToolsPort
from services.orchestrator.loop.runner import TurnInput, TurnRunner
from services.orchestrator.loop.types import Action, ActionState, Message, Role, ToolDef
from services.orchestrator.sessions.base import (
    SessionRecord,
    SessionState,
    SessionStore,
    TurnRecord,
)
from services.orchestrator.sessions.turn_codec import decode_final, encode_final
from services.orchestrator.turn_tools import RecordedTools, TurnScope
from shared.deadlines import Deadline
from shared.errors import Aborted, AgentmeshError, FailedPrecondition, InvalidArgument, NotFound
from shared.principal_wire import valid_customer_id

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
        ceilings: Ceilings | None = None,
        lease_ttl_s: float = 10.0,
        history_window_messages: int = 200,
        turn_tools: RecordedTools | None = None,
        registry_timeout_s: float = 10.0,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._store = store
        self._runner = runner
        self._tools = tools
        self._default_caps = default_caps
        self._ceilings = ceilings or Ceilings(caps=default_caps.model_copy())
        # The turn lease lives this long past its last heartbeat (one every third of it): a
        # dead replica's session frees up within seconds, not the turn budget.
        self._lease_ttl_s = lease_ttl_s
        # A turn loads at most this many of the newest messages (the prompt budgeter trims
        # further, in tokens); GetSession still reads the whole conversation.
        self._history_window = history_window_messages
        # The runner's tools port, when it records finished calls per turn (resume reuses).
        self._turn_tools = turn_tools
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
        if customer_id and not valid_customer_id(customer_id):
            # The tools service accepts only this syntax in the principal it enforces: a
            # session bound to anything else could never use a customer tool.
            raise InvalidArgument(
                "customer_id", "use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        overrides = {k: v for k, v in (caps_overrides or {}).items() if v}
        try:
            caps = Caps.model_validate({**self._default_caps.model_dump(), **overrides})
        except ValueError as exc:
            raise InvalidArgument("budget", "caps must be positive numbers") from exc
        # A field above the ceiling (or above the default, where the default is higher).
        top_caps = Caps.model_validate(
            {
                k: max(v, getattr(self._default_caps, k))
                for k, v in self._ceilings.caps.model_dump().items()
            }
        )
        for name in caps.above(top_caps):
            top = getattr(top_caps, name)
            raise InvalidArgument(
                f"budget.{_BUDGET_FIELDS.get(name, name)}",
                f"above this server's ceiling of {top:g}",
            )
        record = SessionRecord(
            session_id=session_id or self._new_id(),
            caps=caps,
            customer_id=customer_id,
            metadata=dict(metadata or {}),
        )
        await self._store.create(record)
        return record

    async def get_session(
        self, session_id: str, *, last_messages: int | None = None
    ) -> SessionRecord:
        """The session (with ``last_messages``, only that many of its newest messages);
        pending actions past their expiry are marked EXPIRED on the way."""
        _check_session_id(session_id)
        record = await self._store.get(session_id, last_messages=last_messages)
        if record is None:
            raise NotFound("no such session", metadata={"session_id": session_id})
        now = time.time()
        for i, action in enumerate(record.actions):
            if action.state is ActionState.PENDING and action.expires_at <= now:
                expired = dataclasses.replace(action, state=ActionState.EXPIRED, resolved_at=now)
                stored = await self._store.transition_action(
                    session_id, action.action_id, expected=[ActionState.PENDING], new=expired
                )
                record.actions[i] = stored or expired
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
        confirm_action_id: str = "",
        reject_action_id: str = "",
        deadline: Deadline | None = None,
        request_id: str = "",
    ) -> AsyncGenerator[TurnEvent, None]:
        """Runs one turn under the session's lease; persists each completed step as it
        happens and the counters (tool calls, time used) whatever way the turn ends.

        With ``confirm_action_id`` the turn executes exactly that stored action (once, however
        often it is confirmed); with ``reject_action_id`` it declines it.

        With ``request_id`` the turn is idempotent: a finished turn of that id replays its
        TurnStarted and TurnCompleted; one still running elsewhere is ABORTED with a retry
        hint; one whose replica died, or that ended FAILED (a downstream died), runs again as
        the same turn (same index; its partial messages are replaced)."""
        _check_session_id(session_id)
        if request_id and not _CLIENT_SESSION_ID.fullmatch(request_id):
            raise InvalidArgument(
                "request_id", "use 1-64 letters, digits, '-' or '_' (or leave it empty)"
            )
        if lane and lane not in self._ceilings.forceable_lanes:
            raise InvalidArgument(
                "lane",
                "this server lets callers force only: "
                + (", ".join(self._ceilings.forceable_lanes) or "no lane"),
            )
        if confirm_action_id and reject_action_id:
            raise InvalidArgument(
                "reject_action_id", "set only one of confirm_action_id and reject_action_id"
            )
        action_id = confirm_action_id or reject_action_id
        if action_id and len(action_id) > MAX_SESSION_ID_CHARS:
            raise InvalidArgument(
                "confirm_action_id" if confirm_action_id else "reject_action_id", "too long"
            )
        if not user_message.strip() and not action_id:
            raise InvalidArgument("user_message", "must not be empty")
        if len(user_message) > MAX_USER_MESSAGE_CHARS:
            raise InvalidArgument(
                "user_message", f"longer than {MAX_USER_MESSAGE_CHARS} characters"
            )
        record = await self.get_session(session_id, last_messages=0)  # the checks need no history
        prior = await self._store.get_turn(session_id, request_id) if request_id else None
        if prior is not None and prior.finished:
            for replayed in decode_final(prior.final_json):
                yield replayed
            return
        _check_active(record)
        owner = self._new_id()
        token = await self._store.acquire_lease(session_id, owner, self._lease_ttl_s)
        if not token:
            if request_id and await self._store.get_turn(session_id, request_id) is not None:
                raise Aborted(
                    "this turn is still running on another replica; retry",
                    retry_after_s=self._lease_ttl_s,
                    reason="TURN_RUNNING",
                    metadata={"session_id": session_id, "request_id": request_id},
                )
            raise FailedPrecondition(
                "a turn is already in flight for this session",
                reason="TURN_IN_FLIGHT",
                metadata={"session_id": session_id},
            )
        heartbeat = asyncio.create_task(
            self._heartbeat(session_id, owner, token), name=f"lease-{session_id}"
        )
        started = time.monotonic()
        counters = _Counters()
        counters.token = token
        try:
            prior = await self._store.get_turn(session_id, request_id) if request_id else None
            if prior is not None and prior.finished:  # finished while we waited for the lease
                for replayed in decode_final(prior.final_json):
                    yield replayed
                return
            if prior is not None:
                # A dead attempt of this very turn: it runs again in its place.
                dropped = await self._store.discard_turn_messages(
                    session_id, prior.turn_index, token=token
                )
                log.info(
                    "turn %s of session %s runs again (%d partial messages replaced)",
                    request_id,
                    session_id,
                    dropped,
                )
            # Fresh (another replica may have run), and only the window the turn needs.
            record = await self.get_session(session_id, last_messages=self._history_window)
            _check_active(record)
            try:
                registry = await self.registry()
            except AgentmeshError:
                log.warning("tool registry unavailable; the turn runs without tools")
                registry = ()
            action = (
                await self._action_for_turn(
                    record, confirm_action_id, reject_action_id, token=token
                )
                if action_id
                else None
            )
            if action is not None and not user_message.strip():
                verb = "Confirmed" if confirm_action_id else "Rejected"
                user_message = f"{verb}: {action.summary}"
            counters.turn_count = prior.turn_index if prior else record.turn_count + 1
            counters.task_tool_calls = record.task_tool_calls
            counters.base_time = record.task_time_used_s
            await self._store.update_counters(
                session_id,
                turn_count=counters.turn_count,
                task_tool_calls=counters.task_tool_calls,
                task_time_used_s=counters.base_time,
                token=token,
            )
            counters.dirty = True
            if request_id and prior is None:
                await self._store.put_turn(
                    TurnRecord(session_id, request_id, counters.turn_count, ""), token=token
                )
            turn_started: TurnStarted | None = None
            inp = TurnInput(
                session_id=session_id,
                turn_index=counters.turn_count,
                history=_from_turn_start(record.messages),
                user_message=user_message,
                registry=registry,
                caps=record.caps,
                customer_id=record.customer_id,
                task_tool_calls=record.task_tool_calls,
                task_time_used_s=record.task_time_used_s,
                forced_lane=lane,
                deadline=deadline,
                session_committed_cents=_committed_cents(record.actions),
                confirmed_action=action if confirm_action_id else None,
            )
            if action is not None and (reject_action_id or action.state.final):
                turn = self._runner.settled(inp, action)
            else:
                turn = self._runner.run(inp)
            scope = (
                self._turn_tools.scope(
                    TurnScope(
                        session_id,
                        request_id,
                        token,
                        await self._store.tool_results(session_id, request_id) if prior else {},
                    )
                )
                if request_id and self._turn_tools is not None
                else contextlib.nullcontext()
            )
            with scope:
                async with aclosing(turn) as events:
                    async for event in events:
                        if isinstance(event, TurnStarted):
                            turn_started = event
                        elif isinstance(event, MessagesCommitted):
                            await self._store.append_messages(
                                session_id, counters.turn_count, event.messages, token=token
                            )
                            if event.tool_calls_executed:
                                counters.task_tool_calls += event.tool_calls_executed
                                await self._save(session_id, counters, started)
                        elif isinstance(event, ActionProposed):
                            await self._store.add_action(event.action, token=token)
                        elif (
                            isinstance(event, ActionResolved)
                            and action is not None
                            and event.action.state is not action.state
                        ):
                            await self._store.transition_action(
                                session_id,
                                action.action_id,
                                expected=[ActionState.EXECUTING],
                                new=event.action,
                                token=token,
                            )
                        elif (
                            isinstance(event, TurnCompleted)
                            and request_id
                            and event.outcome is not Outcome.FAILED
                        ):
                            # Recorded before the caller sees it: a retry from here on replays.
                            # A FAILED turn (a downstream died) stays open: its retry runs it
                            # again in place, its partial messages replaced.
                            begun = turn_started or TurnStarted(event.turn_id, counters.turn_count)
                            await self._store.put_turn(
                                TurnRecord(
                                    session_id,
                                    request_id,
                                    counters.turn_count,
                                    event.turn_id,
                                    finished=True,
                                    final_json=encode_final(begun, event),
                                ),
                                token=token,
                            )
                        yield event
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await _shielded(self._finish(session_id, owner, counters, started))

    async def _heartbeat(self, session_id: str, owner: str, token: int) -> None:
        """Renews the turn lease every third of its ttl until cancelled or lost."""
        while True:
            await asyncio.sleep(self._lease_ttl_s / 3)
            try:
                renewed = await self._store.renew_lease(session_id, owner, token, self._lease_ttl_s)
            except Exception:
                log.warning("could not renew the lease of session %s", session_id, exc_info=True)
                continue
            if not renewed:
                # Another holder took the session: our next fenced write fails (LEASE_LOST).
                log.warning("session %s: the turn lost its lease", session_id)
                return

    async def _action_for_turn(
        self, record: SessionRecord, confirm_id: str, reject_id: str, *, token: int = 0
    ) -> Action:
        """The action a confirming / rejecting turn acts on, moved to its next state:
        confirm: PENDING -> EXECUTING (an EXECUTING one is resumed, an EXECUTED one replayed);
        reject: PENDING -> REJECTED (a REJECTED one again is the same answer)."""
        field = "confirm_action_id" if confirm_id else "reject_action_id"
        action_id = confirm_id or reject_id
        action = await self._store.get_action(record.session_id, action_id)
        if action is None:
            raise NotFound("no such action in this session", metadata={field: action_id})
        now = time.time()
        if action.state is ActionState.PENDING and action.expires_at <= now:
            expired = dataclasses.replace(action, state=ActionState.EXPIRED, resolved_at=now)
            await self._store.transition_action(
                record.session_id,
                action_id,
                expected=[ActionState.PENDING],
                new=expired,
                token=token,
            )
            raise FailedPrecondition(
                "the action expired; ask for it again", reason="ACTION_EXPIRED"
            )
        if confirm_id:
            if action.state in (ActionState.EXECUTING, ActionState.EXECUTED):
                return action
            if action.state is not ActionState.PENDING:
                raise FailedPrecondition(
                    f"the action is {action.state.value}", reason=f"ACTION_{action.state.name}"
                )
            others = [a for a in record.actions if a.action_id != action_id]
            limits = Limits(self._runner.profile.actions, _committed_cents(others))
            if action.amount_cents > limits.session_left_cents:
                raise FailedPrecondition(
                    "confirming this would exceed the conversation's money limit",
                    reason="ACTION_OVER_LIMIT",
                )
            new = dataclasses.replace(action, state=ActionState.EXECUTING)
        else:
            if action.state is ActionState.REJECTED:
                return action
            if action.state is not ActionState.PENDING:
                raise FailedPrecondition(
                    f"the action is {action.state.value}", reason=f"ACTION_{action.state.name}"
                )
            new = dataclasses.replace(action, state=ActionState.REJECTED, resolved_at=now)
        stored = await self._store.transition_action(
            record.session_id, action_id, expected=[ActionState.PENDING], new=new, token=token
        )
        if stored is None:
            raise NotFound("no such action in this session", metadata={field: action_id})
        return stored

    async def _save(self, session_id: str, counters: _Counters, started: float) -> None:
        await self._store.update_counters(
            session_id,
            turn_count=counters.turn_count,
            task_tool_calls=counters.task_tool_calls,
            task_time_used_s=counters.base_time + (time.monotonic() - started),
            token=counters.token,
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
        self.token = 0


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
_BUDGET_FIELDS = {"turn_budget_s": "turn_budget", "task_budget_s": "task_budget"}


def _committed_cents(actions: list[Action]) -> int:
    """Money this session's executed or executing actions move."""
    return sum(
        a.amount_cents for a in actions if a.state in (ActionState.EXECUTING, ActionState.EXECUTED)
    )


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


def _from_turn_start(messages: list[Message]) -> tuple[Message, ...]:
    """The window without the tail of a turn cut at its start (tool results whose call fell
    outside it): it begins at its first user message (empty if it holds none: a part of one
    turn is no history to show)."""
    for i, message in enumerate(messages):
        if message.role is Role.USER:
            return tuple(messages[i:])
    return ()
