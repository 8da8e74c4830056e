"""AgentService over gRPC: a thin mapping between protobuf and the Agent application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2

from services.orchestrator.access import SessionAccess
from services.orchestrator.agent import Agent
from services.orchestrator.downstream import message_to_proto
from services.orchestrator.loop import events as ev
from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Action, ActionState
from services.orchestrator.metrics import OrchestratorMetrics
from services.orchestrator.sessions.base import SessionRecord, SessionState
from shared.deadlines import current_deadline
from shared.errors import Unavailable

_OUTCOMES = {
    ev.Outcome.COMPLETED: pb.TURN_OUTCOME_COMPLETED,
    ev.Outcome.BUDGET_EXHAUSTED: pb.TURN_OUTCOME_BUDGET_EXHAUSTED,
    ev.Outcome.FAILED: pb.TURN_OUTCOME_FAILED,
    ev.Outcome.AWAITING_CONFIRMATION: pb.TURN_OUTCOME_AWAITING_CONFIRMATION,
}
_ACTION_STATES = {
    ActionState.PENDING: pb.ACTION_STATE_PENDING,
    ActionState.EXECUTING: pb.ACTION_STATE_EXECUTING,
    ActionState.EXECUTED: pb.ACTION_STATE_EXECUTED,
    ActionState.REJECTED: pb.ACTION_STATE_REJECTED,
    ActionState.EXPIRED: pb.ACTION_STATE_EXPIRED,
    ActionState.FAILED: pb.ACTION_STATE_FAILED,
}
_KINDS = {
    ev.EscalationKind.REPROMPT_WITH_SCHEMA: pb.Escalation.KIND_REPROMPT_WITH_SCHEMA,
    ev.EscalationKind.LANE_ESCALATION: pb.Escalation.KIND_LANE_ESCALATION,
}


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return value


def _seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def timestamp(epoch_s: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(epoch_s * 1e9))
    return value


def budget_to_proto(caps: Caps) -> pb.Budget:
    return pb.Budget(
        max_tool_calls_per_turn=caps.max_tool_calls_per_turn,
        max_tool_calls_per_task=caps.max_tool_calls_per_task,
        max_rounds_per_turn=caps.max_rounds_per_turn,
        turn_budget=duration(caps.turn_budget_s),
        task_budget=duration(caps.task_budget_s),
    )


def budget_overrides(budget: pb.Budget) -> dict[str, Any]:
    """Zero fields take the service defaults."""
    return {
        "max_tool_calls_per_turn": budget.max_tool_calls_per_turn,
        "max_tool_calls_per_task": budget.max_tool_calls_per_task,
        "max_rounds_per_turn": budget.max_rounds_per_turn,
        "turn_budget_s": _seconds(budget.turn_budget),
        "task_budget_s": _seconds(budget.task_budget),
    }


def action_to_proto(action: Action) -> pb.Action:
    return pb.Action(
        action_id=action.action_id,
        tool=action.tool,
        arguments_json=action.arguments_json,
        summary=action.summary,
        amount_cents=action.amount_cents,
        currency=action.currency,
        state=_ACTION_STATES[action.state],
        turn_index=action.turn_index,
        created_at=timestamp(action.created_at),
        expires_at=timestamp(action.expires_at),
        resolved_at=timestamp(action.resolved_at) if action.resolved_at else None,
        result_json=action.result_json,
        error_message=action.error_message,
    )


def session_to_proto(record: SessionRecord) -> pb.Session:
    return pb.Session(
        session_id=record.session_id,
        state=pb.SESSION_STATE_ENDED
        if record.state is SessionState.ENDED
        else pb.SESSION_STATE_ACTIVE,
        customer_id=record.customer_id,
        budget=budget_to_proto(record.caps),
        turn_count=record.turn_count,
        task_tool_calls=record.task_tool_calls,
        task_time_used=duration(record.task_time_used_s),
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        messages=[message_to_proto(m) for m in record.messages],
        metadata=record.metadata,
        actions=[action_to_proto(a) for a in record.actions],
    )


def event_to_proto(event: ev.TurnEvent) -> pb.RunTurnResponse | None:
    """The wire form of a turn event; internal events (persistence) have none."""
    if isinstance(event, ev.TurnStarted):
        return pb.RunTurnResponse(
            turn_started=pb.TurnStarted(turn_id=event.turn_id, turn_index=event.turn_index)
        )
    if isinstance(event, ev.PlanMade):
        return pb.RunTurnResponse(
            plan=pb.PlanEvent(
                text=event.text,
                chosen_tools=list(event.chosen_tools),
                lane=event.lane,
                round=event.round,
                calls=[pb.PlannedCall(tool=c.tool, intent=c.intent) for c in event.calls],
            )
        )
    if isinstance(event, ev.ToolCallStarted):
        return pb.RunTurnResponse(
            tool_call_started=pb.ToolCallStarted(
                call_id=event.call_id,
                name=event.name,
                arguments_json=event.arguments_json,
                round=event.round,
            )
        )
    if isinstance(event, ev.ToolCallFinished):
        return pb.RunTurnResponse(
            tool_call_finished=pb.ToolCallFinished(
                call_id=event.call_id,
                name=event.name,
                arguments_json=event.arguments_json,
                status=event.status,
                latency=duration(event.latency_s),
                truncated=event.truncated,
                error_message=event.error_message,
                round=event.round,
            )
        )
    if isinstance(event, ev.Escalated):
        return pb.RunTurnResponse(
            escalation=pb.Escalation(
                kind=_KINDS[event.kind],
                from_lane=event.from_lane,
                to_lane=event.to_lane,
                reason=event.reason,
            )
        )
    if isinstance(event, ev.ActionProposed):
        return pb.RunTurnResponse(
            action_proposed=pb.ActionProposed(action=action_to_proto(event.action))
        )
    if isinstance(event, ev.ActionResolved):
        return pb.RunTurnResponse(
            action_resolved=pb.ActionResolved(action=action_to_proto(event.action))
        )
    if isinstance(event, ev.ComposeText):
        return pb.RunTurnResponse(compose_delta=pb.ComposeDelta(text=event.text))
    if isinstance(event, ev.TurnCompleted):
        lat = event.latency
        return pb.RunTurnResponse(
            turn_completed=pb.TurnCompleted(
                turn_id=event.turn_id,
                answer=event.answer,
                outcome=_OUTCOMES[event.outcome],
                usage=[
                    pb.LaneUsage(
                        lane=u.lane,
                        model=u.model,
                        usage=common_pb2.Usage(
                            prompt_tokens=u.usage.prompt_tokens,
                            completion_tokens=u.usage.completion_tokens,
                            cached_prompt_tokens=u.usage.cached_prompt_tokens,
                        ),
                        generations=u.generations,
                    )
                    for u in event.usage
                ],
                latency=pb.LatencyBreakdown(
                    plan=duration(lat.plan),
                    tool_emit=duration(lat.tool_emit),
                    tool_wall=duration(lat.tool_wall),
                    observe=duration(lat.observe),
                    compose=duration(lat.compose),
                    queue_prefill=duration(lat.queue_prefill),
                    network=duration(lat.network),
                    total=duration(lat.total),
                ),
                tool_calls=event.tool_calls,
                task_tool_calls=event.task_tool_calls,
                notes=list(event.notes),
                llm_stages=event.llm_stages,
            )
        )
    return None


class AgentServicer(orchestrator_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        agent: Agent,
        metrics: OrchestratorMetrics | None = None,
        access: SessionAccess | None = None,
    ) -> None:
        self._agent = agent
        self._metrics = metrics
        self._access = access or SessionAccess(agent.default_caps)
        self.ready = False

    def _check_ready(self) -> None:
        if not self.ready:
            raise Unavailable("the orchestrator is warming up")

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateSessionResponse:
        self._check_ready()
        self._access.check_budget(budget_overrides(request.budget))
        record = await self._agent.create_session(
            customer_id=request.customer_id,
            caps_overrides=budget_overrides(request.budget),
            metadata=self._access.new_session_metadata(request.metadata),
            session_id=request.session_id,
        )
        return pb.CreateSessionResponse(session=session_to_proto(record))

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetSessionResponse:
        self._check_ready()
        record = await self._agent.get_session(request.session_id)
        self._access.check_visible(record)
        return pb.GetSessionResponse(session=session_to_proto(record))

    async def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EndSessionResponse:
        self._check_ready()
        # The owner check needs the session's metadata, not its conversation.
        owned = await self._agent.get_session(request.session_id, last_messages=0)
        self._access.check_visible(owned, ending=True)
        record = await self._agent.end_session(request.session_id)
        return pb.EndSessionResponse(session=session_to_proto(record))

    async def RunTurn(
        self, request: pb.RunTurnRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.RunTurnResponse]:
        self._check_ready()
        self._access.check_lane(request.lane)
        self._access.check_visible(
            await self._agent.get_session(request.session_id, last_messages=0)
        )
        turn = self._agent.run_turn(
            request.session_id,
            request.user_message,
            lane=request.lane,
            confirm_action_id=request.confirm_action_id,
            reject_action_id=request.reject_action_id,
            deadline=current_deadline(),
            request_id=request.request_id,
        )
        observer = self._metrics.turn(request.session_id) if self._metrics is not None else None
        try:
            async with aclosing(turn) as events:
                async for event in events:
                    if observer is not None:
                        observer.observe(event)
                    message = event_to_proto(event)
                    if message is not None:
                        yield message
        finally:
            if observer is not None:
                observer.close()
