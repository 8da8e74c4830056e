"""The session store contract. All session state lives in the store, so any orchestrator
replica can continue any session and a restart loses no completed step; the one-turn-in-flight
rule is a lease in the store (with expiry), not an in-process lock, so it holds across
replicas and frees itself if a replica dies mid-turn.

The lease is short and renewed by the holder's heartbeat. Each acquisition returns a new
fencing token (increasing per session); a write that carries a token is rejected with
:class:`LeaseLost` once another holder acquired the lease after it, so a replica that stalled
past its lease can never write over the turn that replaced it. Token 0 means an unfenced write
(outside a turn)."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Action, ActionState, Message
from shared.errors import Aborted

UNFENCED = 0


class LeaseLost(Aborted):
    """A fenced write from a holder whose lease another holder has since acquired."""

    def __init__(self, session_id: str, retry_after_s: float = 1.0) -> None:
        super().__init__(
            "the turn lost its lease on the session to another turn",
            retry_after_s=retry_after_s,
            reason="LEASE_LOST",
            metadata={"session_id": session_id},
        )


@dataclass
class TurnRecord:
    """What the store keeps of a turn run under a caller's request id: its index, and once
    finished its final event (JSON) to replay to a retry."""

    session_id: str
    request_id: str
    turn_index: int
    turn_id: str
    finished: bool = False
    final_json: str = ""
    updated_at: float = field(default_factory=time.time)


class SessionState(enum.Enum):
    ACTIVE = "active"
    ENDED = "ended"


@dataclass
class SessionRecord:
    session_id: str
    caps: Caps
    customer_id: str = ""
    state: SessionState = SessionState.ACTIVE
    turn_count: int = 0
    task_tool_calls: int = 0
    task_time_used_s: float = 0.0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    metadata: dict[str, str] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    # Proposed write actions, oldest first.
    actions: list[Action] = field(default_factory=list)


class SessionStore(Protocol):
    """Durable sessions. Only the holder of a session's lease appends to it."""

    async def open(self) -> None:
        """Connects and creates the schema if needed."""
        ...

    async def close(self) -> None: ...

    async def create(self, record: SessionRecord) -> None:
        """Store a new session; AlreadyExists if its id is taken (atomically)."""
        ...

    async def get(
        self, session_id: str, *, last_messages: int | None = None
    ) -> SessionRecord | None:
        """The session with its messages in order; None when unknown. With
        ``last_messages`` only the newest that many messages are read (still oldest first):
        a turn loads a bounded window, not the whole history."""
        ...

    async def append_messages(
        self,
        session_id: str,
        turn_index: int,
        messages: Sequence[Message],
        *,
        token: int = UNFENCED,
    ) -> None:
        """Appends in order; LeaseLost if ``token`` is stale."""
        ...

    async def update_counters(
        self,
        session_id: str,
        *,
        turn_count: int,
        task_tool_calls: int,
        task_time_used_s: float,
        token: int = UNFENCED,
    ) -> None:
        """LeaseLost if ``token`` is stale."""
        ...

    async def end(self, session_id: str) -> bool:
        """Marks the session ended; False when unknown."""
        ...

    async def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> int:
        """Takes the session's turn lease unless another owner holds an unexpired one.
        Returns the lease's fencing token (> 0, larger than any before it), or 0 when the
        lease is held."""
        ...

    async def renew_lease(self, session_id: str, owner: str, token: int, ttl_s: float) -> bool:
        """Extends the lease to ``ttl_s`` from now if ``owner`` with ``token`` still holds it
        (or it lapsed and nobody took it since); False when it was lost."""
        ...

    async def release_lease(self, session_id: str, owner: str) -> None:
        """Frees the lease if ``owner`` still holds it."""
        ...

    async def add_action(self, action: Action, *, token: int = UNFENCED) -> None:
        """Stores a new proposed action of its session; AlreadyExists if its id is taken;
        LeaseLost if ``token`` is stale."""
        ...

    async def get_action(self, session_id: str, action_id: str) -> Action | None:
        """The action, or None when the session has no action with that id."""
        ...

    async def transition_action(
        self,
        session_id: str,
        action_id: str,
        *,
        expected: Sequence[ActionState],
        new: Action,
        token: int = UNFENCED,
    ) -> Action | None:
        """Atomically replaces the stored action with ``new`` (same id) if its current state
        is one of ``expected`` (compare-and-set, across replicas). Returns the stored action
        after the call: ``new`` when the swap happened, the unchanged current one when it did
        not; None when the action is unknown. LeaseLost if ``token`` is stale."""
        ...

    async def get_turn(self, session_id: str, request_id: str) -> TurnRecord | None:
        """The turn recorded under the caller's ``request_id``; None when unknown."""
        ...

    async def put_turn(self, turn: TurnRecord, *, token: int) -> None:
        """Records (or replaces) the turn under its request id; LeaseLost if ``token`` is
        stale."""
        ...

    async def record_tool_results(
        self, session_id: str, request_id: str, results: Mapping[str, str], *, token: int
    ) -> None:
        """Durably records finished tool calls of the turn run under ``request_id`` (call key
        -> outcome JSON), so a resumed attempt does not run them again. LeaseLost if
        ``token`` is stale."""
        ...

    async def tool_results(self, session_id: str, request_id: str) -> dict[str, str]:
        """The finished tool calls recorded for the turn under ``request_id``."""
        ...

    async def discard_turn_messages(self, session_id: str, turn_index: int, *, token: int) -> int:
        """Deletes the messages of one turn (a dead attempt's, before it runs again); returns
        how many. LeaseLost if ``token`` is stale."""
        ...
