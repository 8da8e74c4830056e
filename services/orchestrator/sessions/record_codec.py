"""A session row's fields, the same in every store: what ``create`` writes and what ``get``
reads back (the stores add the messages and actions they keep apart)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Action, Message
from services.orchestrator.sessions.base import SessionRecord, SessionState


def session_fields(record: SessionRecord) -> dict[str, Any]:
    """The session's own fields (no messages, no actions), by column / hash field name."""
    return {
        "state": record.state.value,
        "customer_id": record.customer_id,
        "caps_json": record.caps.model_dump_json(),
        "turn_count": record.turn_count,
        "task_tool_calls": record.task_tool_calls,
        "task_time_used_s": record.task_time_used_s,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "metadata_json": json.dumps(record.metadata, sort_keys=True),
    }


def session_from_fields(
    session_id: str,
    fields: Mapping[str, Any],
    messages: list[Message],
    actions: list[Action],
) -> SessionRecord:
    """The record of :func:`session_fields`' output as a store gives it back (typed columns
    or strings); fields a store's older records lack take their defaults."""
    return SessionRecord(
        session_id=session_id,
        caps=Caps.model_validate_json(fields["caps_json"]),
        customer_id=fields.get("customer_id") or "",
        state=SessionState(fields["state"]),
        turn_count=int(fields.get("turn_count") or 0),
        task_tool_calls=int(fields.get("task_tool_calls") or 0),
        task_time_used_s=float(fields.get("task_time_used_s") or 0.0),
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
        metadata=json.loads(fields.get("metadata_json") or "{}"),
        messages=messages,
        actions=actions,
    )
