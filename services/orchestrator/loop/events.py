"""Typed events a turn yields. The servicer maps them to RunTurnResponse; the session layer
persists MessagesCommitted as they happen so a crash loses no completed step."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.orchestrator.loop.types import Action, Message, ToolCall, ToolOutcome, Usage


@dataclass(frozen=True)
class TurnStarted:
    turn_id: str
    turn_index: int


@dataclass(frozen=True)
class PlannedCall:
    tool: str
    intent: str = ""


@dataclass(frozen=True)
class PlanMade:
    text: str
    chosen_tools: tuple[str, ...]
    lane: str
    round: int
    calls: tuple[PlannedCall, ...] = ()


@dataclass(frozen=True)
class ToolCallStarted:
    call_id: str
    name: str
    arguments_json: str
    round: int


@dataclass(frozen=True)
class ToolCallFinished:
    call_id: str
    name: str
    arguments_json: str
    # A tools.v1 status name ("OK", "UNAVAILABLE", ...) or REFUSED / SKIPPED_DUPLICATE.
    status: str
    latency_s: float
    truncated: bool
    error_message: str
    round: int

    @classmethod
    def ran(cls, call: ToolCall, outcome: ToolOutcome, round: int) -> ToolCallFinished:
        """A call the tools service ran, as it reported it."""
        return cls(
            call.id,
            call.name,
            call.arguments_json,
            outcome.status,
            outcome.latency_s,
            outcome.truncated,
            outcome.error_message,
            round,
        )

    @classmethod
    def not_run(cls, call: ToolCall, status: str, why: str, round: int) -> ToolCallFinished:
        """A call that did not run (skipped, declined, proposed, invalid, result unknown)."""
        return cls(call.id, call.name, call.arguments_json, status, 0.0, False, why, round)


class EscalationKind(enum.Enum):
    REPROMPT_WITH_SCHEMA = "reprompt_with_schema"
    LANE_ESCALATION = "lane_escalation"


@dataclass(frozen=True)
class Escalated:
    kind: EscalationKind
    from_lane: str
    to_lane: str
    reason: str


@dataclass(frozen=True)
class ComposeText:
    text: str


@dataclass(frozen=True)
class MessagesCommitted:
    """Messages that completed and belong in the session history (internal, not streamed)."""

    messages: tuple[Message, ...]
    tool_calls_executed: int = 0


@dataclass(frozen=True)
class ActionProposed:
    """A write was proposed, not executed; the agent layer stores it with the session."""

    action: Action


@dataclass(frozen=True)
class ActionResolved:
    """A confirmed action ran (EXECUTED / FAILED) or a pending one was rejected."""

    action: Action


class Outcome(enum.Enum):
    COMPLETED = "completed"
    BUDGET_EXHAUSTED = "budget_exhausted"
    FAILED = "failed"
    AWAITING_CONFIRMATION = "awaiting_confirmation"


@dataclass
class LaneUsage:
    lane: str
    model: str = ""
    usage: Usage = field(default_factory=Usage)
    generations: int = 0


@dataclass
class Latency:
    """The seed's per-turn latency budget table, measured (seconds)."""

    plan: float = 0.0
    tool_emit: float = 0.0
    tool_wall: float = 0.0
    observe: float = 0.0
    compose: float = 0.0
    queue_prefill: float = 0.0
    network: float = 0.0
    total: float = 0.0


@dataclass(frozen=True)
class TurnCompleted:
    turn_id: str
    answer: str
    outcome: Outcome
    usage: tuple[LaneUsage, ...]
    latency: Latency
    tool_calls: int
    task_tool_calls: int
    notes: tuple[str, ...]
    # Sequential LLM stages (parallel generations inside one stage count once).
    llm_stages: int = 0


TurnEvent = (
    TurnStarted
    | PlanMade
    | ToolCallStarted
    | ToolCallFinished
    | Escalated
    | ComposeText
    | MessagesCommitted
    | ActionProposed
    | ActionResolved
    | TurnCompleted
)
