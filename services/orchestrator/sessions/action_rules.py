"""Checks every store applies to proposed actions before touching the backend."""

from __future__ import annotations

from services.orchestrator.loop.types import Action
from shared.errors import InvalidArgument


def check_replacement(session_id: str, action_id: str, new: Action) -> None:
    """A transition replaces an action's fields, never its identity."""
    if new.action_id != action_id or new.session_id != session_id:
        raise InvalidArgument(
            "new", "the replacement must keep the action's action_id and session_id"
        )
