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
from services.orchestrator.loop.types import Message


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
