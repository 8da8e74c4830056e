"""The session store's SQL tables (one prefix for all of them) and action row mapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from services.orchestrator.loop.types import Action, ActionState


@dataclass(frozen=True)
class SessionTables:
    meta: MetaData
    sessions: Table
    messages: Table
    actions: Table
    turns: Table
    tool_results: Table


def session_tables(prefix: str) -> SessionTables:
    meta = MetaData()
    sessions = Table(
        f"{prefix}sessions",
        meta,
        Column("session_id", String(64), primary_key=True),
        Column("state", String(16), nullable=False),
        Column("customer_id", String(128), nullable=False, default=""),
        Column("caps_json", Text, nullable=False),
        Column("turn_count", Integer, nullable=False, default=0),
        Column("task_tool_calls", Integer, nullable=False, default=0),
        Column("task_time_used_s", Float, nullable=False, default=0.0),
        Column("created_at", Float, nullable=False),
        Column("updated_at", Float, nullable=False),
        Column("metadata_json", Text, nullable=False, default="{}"),
        Column("lease_owner", String(64), nullable=True),
        Column("lease_expires_at", Float, nullable=True),
        # The fencing token of the latest lease acquisition (see sessions.base).
        Column("lease_token", BigInteger, nullable=False, default=0, server_default="0"),
    )
    messages = Table(
        f"{prefix}messages",
        meta,
        Column("session_id", String(64), nullable=False),
        Column("seq", Integer, nullable=False),
        Column("turn_index", Integer, nullable=False),
        Column("data_json", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        PrimaryKeyConstraint("session_id", "seq"),
    )
    # ``seq`` keeps insertion order (the tie-break of equal created_at); action ids are
    # unique across sessions because the idempotency key derives from the id alone.
    actions = Table(
        f"{prefix}actions",
        meta,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("action_id", String(128), nullable=False, unique=True),
        Column("session_id", String(64), nullable=False),
        Column("tool", String(128), nullable=False),
        Column("arguments_json", Text, nullable=False),
        Column("summary", Text, nullable=False),
        Column("amount_cents", BigInteger, nullable=False),
        Column("currency", String(8), nullable=False),
        Column("state", String(16), nullable=False),
        Column("turn_index", Integer, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("expires_at", Float, nullable=False),
        Column("resolved_at", Float, nullable=False),
        Column("result_json", Text, nullable=False),
        Column("error_message", Text, nullable=False),
    )
    Index(f"ix_{prefix}actions_session", actions.c.session_id, actions.c.created_at)
    # Turns run under a caller's request id: the final event a retry replays.
    turns = Table(
        f"{prefix}turns",
        meta,
        Column("session_id", String(64), nullable=False),
        Column("request_id", String(64), nullable=False),
        Column("turn_index", Integer, nullable=False),
        Column("turn_id", String(64), nullable=False),
        Column("finished", Integer, nullable=False, default=0),
        Column("final_json", Text, nullable=False, default=""),
        Column("updated_at", Float, nullable=False),
        PrimaryKeyConstraint("session_id", "request_id"),
    )
    # Tool calls a turn (under a request id) finished: a resumed attempt reuses them.
    tool_results = Table(
        f"{prefix}tool_results",
        meta,
        Column("session_id", String(64), nullable=False),
        Column("request_id", String(64), nullable=False),
        Column("call_key", String(64), nullable=False),
        Column("outcome_json", Text, nullable=False),
        PrimaryKeyConstraint("session_id", "request_id", "call_key"),
    )
    return SessionTables(
        meta=meta,
        sessions=sessions,
        messages=messages,
        actions=actions,
        turns=turns,
        tool_results=tool_results,
    )


def action_values(action: Action) -> dict[str, Any]:
    """The action's columns (all but ``seq``)."""
    return {
        "action_id": action.action_id,
        "session_id": action.session_id,
        "tool": action.tool,
        "arguments_json": action.arguments_json,
        "summary": action.summary,
        "amount_cents": action.amount_cents,
        "currency": action.currency,
        "state": action.state.value,
        "turn_index": action.turn_index,
        "created_at": action.created_at,
        "expires_at": action.expires_at,
        "resolved_at": action.resolved_at,
        "result_json": action.result_json,
        "error_message": action.error_message,
    }


def action_from_row(row: Any) -> Action:
    m = row._mapping
    return Action(
        action_id=m["action_id"],
        session_id=m["session_id"],
        tool=m["tool"],
        arguments_json=m["arguments_json"],
        summary=m["summary"],
        amount_cents=int(m["amount_cents"]),
        currency=m["currency"],
        state=ActionState(m["state"]),
        turn_index=int(m["turn_index"]),
        created_at=float(m["created_at"]),
        expires_at=float(m["expires_at"]),
        resolved_at=float(m["resolved_at"]),
        result_json=m["result_json"],
        error_message=m["error_message"],
    )
