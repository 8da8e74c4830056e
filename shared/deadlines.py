"""Deadlines that code without gRPC can carry and pass downstream.

The server interceptor records each call's remaining time in a context variable; clients
read it back with :func:`downstream_timeout` so a downstream call never outlives its caller.
The agent loop uses :class:`Deadline` directly and knows nothing of gRPC.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass

from shared.errors import DeadlineExceeded


@dataclass(frozen=True)
class Deadline:
    """An absolute point on the monotonic clock."""

    expires_at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def time_remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def expired(self) -> bool:
        return self.time_remaining() <= 0

    def earliest(self, other: Deadline | None) -> Deadline:
        if other is None or self.expires_at <= other.expires_at:
            return self
        return other

    def within(self, seconds: float) -> Deadline:
        """This deadline, or one ``seconds`` from now if that comes first."""
        return self.earliest(Deadline.after(seconds))

    def timeout(self, margin_s: float = 0.0) -> float:
        """Seconds a downstream call may take; raises once nothing is left."""
        remaining = self.time_remaining() - margin_s
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded before the downstream call")
        return remaining


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "agentmesh_deadline", default=None
)


def current_deadline() -> Deadline | None:
    """The deadline of the RPC being served, if its caller set one."""
    return _current.get()


def set_current_deadline(deadline: Deadline | None) -> contextvars.Token[Deadline | None]:
    return _current.set(deadline)


def reset_current_deadline(token: contextvars.Token[Deadline | None]) -> None:
    _current.reset(token)


def downstream_timeout(
    margin_s: float = 0.05,
    *,
    deadline: Deadline | None = None,
    default_s: float | None = None,
) -> float | None:
    """Timeout for a downstream call: the caller's remaining time minus ``margin_s``.

    Uses ``deadline`` when given, else the current RPC's deadline; ``default_s`` when
    neither exists (None: no timeout).
    """
    chosen = deadline or current_deadline()
    if chosen is None:
        return default_s
    timeout = chosen.timeout(margin_s)
    return min(timeout, default_s) if default_s is not None else timeout
