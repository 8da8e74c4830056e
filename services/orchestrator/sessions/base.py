"""The session store contract. All session state lives in the store, so any orchestrator
replica can continue any session and a restart loses no completed step; the one-turn-in-flight
rule is a lease in the store (with expiry), not an in-process lock, so it holds across
replicas and frees itself if a replica dies mid-turn."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Action, ActionState, Message


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

    async def get(self, session_id: str) -> SessionRecord | None:
        """The session with its messages in order; None when unknown."""
        ...

    async def append_messages(
        self, session_id: str, turn_index: int, messages: Sequence[Message]
    ) -> None: ...

    async def update_counters(
        self,
        session_id: str,
        *,
        turn_count: int,
        task_tool_calls: int,
        task_time_used_s: float,
    ) -> None: ...

    async def end(self, session_id: str) -> bool:
        """Marks the session ended; False when unknown."""
        ...

    async def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> bool:
        """Takes the session's turn lease unless another owner holds an unexpired one."""
        ...

    async def release_lease(self, session_id: str, owner: str) -> None:
        """Frees the lease if ``owner`` still holds it."""
        ...

    async def add_action(self, action: Action) -> None:
        """Stores a new proposed action of its session; AlreadyExists if its id is taken."""
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
    ) -> Action | None:
        """Atomically replaces the stored action with ``new`` (same id) if its current state
        is one of ``expected`` (compare-and-set, across replicas). Returns the stored action
        after the call: ``new`` when the swap happened, the unchanged current one when it did
        not; None when the action is unknown."""
        ...
