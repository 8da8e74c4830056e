"""Plain domain values the loop, the ports and the stores share (no protobuf, no gRPC)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class Role(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class Message:
    """One chat message; tool messages carry the call id they answer."""

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role.value,
            "content": self.content,
            "tool_calls": [
                {"id": c.id, "name": c.name, "arguments_json": c.arguments_json}
                for c in self.tool_calls
            ],
            "tool_call_id": self.tool_call_id,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        return cls(
            role=Role(data["role"]),
            content=data.get("content", ""),
            tool_calls=tuple(
                ToolCall(c["id"], c["name"], c["arguments_json"])
                for c in data.get("tool_calls", [])
            ),
            tool_call_id=data.get("tool_call_id", ""),
            name=data.get("name", ""),
        )


class Effect(enum.Enum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class ToolDef:
    """A registry entry as ListTools returns it."""

    name: str
    description: str
    parameters_json_schema: str
    effect: Effect = Effect.READ
    timeout_ms: int = 0

    @property
    def schema(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.parameters_json_schema or "{}")
        return parsed


class Decoding(enum.Enum):
    CONSTRAINED = "constrained"
    UNCONSTRAINED = "unconstrained"


@dataclass(frozen=True)
class LaneRequest:
    """Which lane serves a generation: a named lane, or auto by stage + escalation level."""

    stage: str  # "plan" | "tool_call" | "compose"
    escalation_level: int = 0
    lane: str = ""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_prompt_tokens += other.cached_prompt_tokens


@dataclass(frozen=True)
class GenerationStats:
    """What a downstream generation reports about itself (server side)."""

    lane: str = ""
    model: str = ""
    usage: Usage = field(default_factory=Usage)
    # Time to first token, as the engine measured it (queue + prefill).
    ttft_s: float = 0.0
    # Server-side elapsed time of the RPC; wall minus this is network + serialization.
    elapsed_s: float = 0.0
    generations: int = 1
    finish_reason: str = ""


@dataclass(frozen=True)
class GenerateResult:
    text: str
    stats: GenerationStats


@dataclass(frozen=True)
class EmittedCall:
    """One call from the tool-call stage; ``ok`` is the parse/validation outcome."""

    call: ToolCall
    ok: bool
    parse_error: str = ""
    raw_text: str = ""


@dataclass(frozen=True)
class CallToolsResult:
    calls: tuple[EmittedCall, ...]
    stats: GenerationStats


@dataclass(frozen=True)
class ComposeDelta:
    text: str


@dataclass(frozen=True)
class ComposeDone:
    stats: GenerationStats


@dataclass(frozen=True)
class ToolInvocation:
    call_id: str
    name: str
    arguments_json: str
    idempotency_key: str = ""
    timeout_ms: int = 0


@dataclass(frozen=True)
class ToolOutcome:
    """Per-call result of ExecuteTools. ``status`` is a tools.v1 ToolResultStatus name."""

    call_id: str
    name: str
    status: str
    error_message: str = ""
    result_json: str = ""
    fenced_result: str = ""
    truncated: bool = False
    latency_s: float = 0.0
    source: str = ""
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "OK"


def canonical_args(arguments_json: str) -> str:
    """Arguments rendered canonically, so identical calls compare equal byte for byte."""
    try:
        value = json.loads(arguments_json or "{}")
    except ValueError:
        return arguments_json.strip()
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ActionState(enum.Enum):
    """A proposed write's life: PENDING until confirmed (EXECUTING -> EXECUTED | FAILED),
    rejected or expired."""

    PENDING = "pending"
    EXECUTING = "executing"
    EXECUTED = "executed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (
            ActionState.EXECUTED,
            ActionState.REJECTED,
            ActionState.EXPIRED,
            ActionState.FAILED,
        )


@dataclass(frozen=True)
class Action:
    """A write the agent proposed. Arguments are frozen at proposal (canonical JSON, principal
    arguments included); confirming executes exactly these with ``idempotency_key``."""

    action_id: str
    session_id: str
    tool: str
    arguments_json: str
    summary: str
    amount_cents: int = 0
    currency: str = ""
    state: ActionState = ActionState.PENDING
    turn_index: int = 0
    created_at: float = 0.0
    expires_at: float = 0.0
    resolved_at: float = 0.0
    result_json: str = ""
    error_message: str = ""

    @property
    def idempotency_key(self) -> str:
        """Derived from the action's identity only: however often (or wherever) the action
        is confirmed, the tools service moves money for it once."""
        return f"am-action-{self.action_id}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "action_id": self.action_id,
            "session_id": self.session_id,
            "tool": self.tool,
            "arguments_json": self.arguments_json,
            "summary": self.summary,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "state": self.state.value,
            "turn_index": self.turn_index,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "resolved_at": self.resolved_at,
            "result_json": self.result_json,
            "error_message": self.error_message,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Action:
        return cls(
            action_id=data["action_id"],
            session_id=data["session_id"],
            tool=data["tool"],
            arguments_json=data["arguments_json"],
            summary=data.get("summary", ""),
            amount_cents=int(data.get("amount_cents", 0)),
            currency=data.get("currency", ""),
            state=ActionState(data.get("state", "pending")),
            turn_index=int(data.get("turn_index", 0)),
            created_at=float(data.get("created_at", 0.0)),
            expires_at=float(data.get("expires_at", 0.0)),
            resolved_at=float(data.get("resolved_at", 0.0)),
            result_json=data.get("result_json", ""),
            error_message=data.get("error_message", ""),
        )
