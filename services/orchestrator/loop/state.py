"""The typed state of one running turn: what the stages read and write."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.orchestrator.loop.events import LaneUsage, Latency, Outcome
from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.trace import NoTrace, TurnTrace
from services.orchestrator.loop.types import Action, Message, Principal, ToolDef
from shared.deadlines import Deadline


@dataclass(frozen=True)
class TurnInput:
    session_id: str
    turn_index: int
    history: tuple[Message, ...]
    user_message: str
    registry: tuple[ToolDef, ...]
    caps: Caps
    customer_id: str = ""
    task_tool_calls: int = 0
    task_time_used_s: float = 0.0
    # Forces one lane for every stage; empty: automatic selection and escalation.
    forced_lane: str = ""
    # The caller's RPC deadline, if any.
    deadline: Deadline | None = None
    # Money already committed by this session's executed (or executing) actions, in cents.
    session_committed_cents: int = 0
    # A confirmed action to execute instead of planning (its state is EXECUTING).
    confirmed_action: Action | None = None

    @property
    def turn_id(self) -> str:
        return f"{self.session_id}-t{self.turn_index}"

    @property
    def principal(self) -> Principal:
        return Principal(self.customer_id)


class NoteKind(enum.Enum):
    """Why something in the turn did not happen; decides the outcome and the answer's tail."""

    CAP = "cap"  # a tool-call or round cap stopped the turn
    BUDGET = "budget"  # a wall-clock budget ran out
    TOOL_FAILED = "tool_failed"  # a tool answered with an error (observed, not fatal)
    INVALID_CALL = "invalid_call"  # no valid call after the failure ladder
    DUPLICATE = "duplicate"  # an identical call was stopped
    DECLINED = "declined"  # a write could not be proposed (no record, ceiling)
    CONTEXT = "context"  # history dropped or a message cut to fit the context window
    STAGE_FAILED = "stage_failed"  # a downstream LLM stage failed
    ANSWER_FAILED = "answer_failed"  # a downstream died while the answer was written
    ACTION_FAILED = "action_failed"  # a confirmed action's result is unknown
    LANE_FAILOVER = "lane_failover"  # a lane's deployment was down: the next rung served


# Notes of these kinds are told to the user at the end of the answer.
TOLD = {
    NoteKind.CAP,
    NoteKind.BUDGET,
    NoteKind.DECLINED,
    NoteKind.ANSWER_FAILED,
    NoteKind.ACTION_FAILED,
}


@dataclass(frozen=True)
class Note:
    kind: NoteKind
    text: str


@dataclass
class TurnState:
    """Mutable state of one running turn."""

    inp: TurnInput
    turn_deadline: Deadline
    tools_deadline: Deadline
    # The fixed prefix (system prompt, customer context): never changes, so it stays cached.
    base: list[Message]
    history: list[Message]
    user: Message
    # This turn's assistant tool-call messages and tool results, in order.
    traffic: list[Message] = field(default_factory=list)
    # Tools this principal may use, by name (full definitions, principal arguments included).
    tools: dict[str, ToolDef] = field(default_factory=dict)
    # The same tools as the model sees them (principal arguments stripped), registry order.
    model_tools: tuple[ToolDef, ...] = ()
    calls: int = 0
    call_seq: int = 0
    rounds: int = 0
    seen: set[tuple[str, str]] = field(default_factory=set)
    notes: list[Note] = field(default_factory=list)
    proposals: list[Action] = field(default_factory=list)
    # The tools the plan itself chose, before the profile's selection mode.
    planned: tuple[str, ...] = ()
    tool_level: int = 0
    lane_escalations: int = 0
    llm_stages: int = 0
    # Tokens one tool observation may take in this turn's prompts.
    observe_tokens: int = 1000
    usage: dict[str, LaneUsage] = field(default_factory=dict)
    latency: Latency = field(default_factory=Latency)
    answer: str = ""
    # The turn's observer (spans, recording); the runner sets it.
    trace: TurnTrace = field(default_factory=NoTrace)

    def messages(self) -> list[Message]:
        return [*self.base, *self.history, self.user, *self.traffic]

    @property
    def task_calls(self) -> int:
        return self.inp.task_tool_calls + self.calls

    def calls_left(self) -> int:
        caps = self.inp.caps
        return max(
            0,
            min(
                caps.max_tool_calls_per_turn - self.calls,
                caps.max_tool_calls_per_task - self.task_calls,
            ),
        )

    def rounds_left(self) -> int:
        return max(0, self.inp.caps.max_rounds_per_turn - self.rounds)

    def cap_text(self) -> str:
        caps = self.inp.caps
        if self.task_calls >= caps.max_tool_calls_per_task or (
            caps.max_tool_calls_per_task - self.task_calls
            < caps.max_tool_calls_per_turn - self.calls
        ):
            return f"the task's tool-call cap ({caps.max_tool_calls_per_task}) was reached"
        return f"the turn's tool-call cap ({caps.max_tool_calls_per_turn}) was reached"

    def note(self, kind: NoteKind, text: str) -> None:
        if all(n.text != text for n in self.notes):
            self.notes.append(Note(kind, text))

    def has(self, *kinds: NoteKind) -> bool:
        return any(n.kind in kinds for n in self.notes)

    def told(self) -> list[str]:
        return [n.text for n in self.notes if n.kind in TOLD]

    def outcome(self) -> Outcome:
        if self.has(NoteKind.ANSWER_FAILED, NoteKind.ACTION_FAILED):
            return Outcome.FAILED
        if self.proposals:
            return Outcome.AWAITING_CONFIRMATION
        if self.has(NoteKind.CAP, NoteKind.BUDGET):
            return Outcome.BUDGET_EXHAUSTED
        return Outcome.COMPLETED
