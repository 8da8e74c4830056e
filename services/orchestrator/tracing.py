"""OpenTelemetry spans of a turn, from the loop's observer hooks (loop/trace.py).

One ``invoke_agent`` span per turn (a child of the RunTurn server span, so the turn's trace
is the caller's), under it one ``stage {name}`` span per stage in the order they ran, the
LLM stages each with a ``chat {model}`` child. Stage spans are laid out from the loop's own
clock: they never overlap, so they add up to the turn less the gaps between stages. The tools
service adds the ``execute_tool {name}`` spans (shared/semconv.py has every name).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from services.orchestrator.loop import events as ev
from services.orchestrator.loop.state import TurnInput
from services.orchestrator.loop.trace import TurnTrace
from services.orchestrator.loop.types import GenerationStats
from shared import semconv as sc
from shared.telemetry import Telemetry


class OtelTurnTracer:
    """TurnTracer writing spans through ``telemetry``'s tracer."""

    def __init__(self, telemetry: Telemetry, agent_name: str = sc.AGENT_NAME) -> None:
        self._telemetry = telemetry
        self._agent = agent_name

    def begin(self, inp: TurnInput, started: float) -> TurnTrace:
        return _OtelTurn(self._telemetry, self._agent, inp, started)


class _OtelTurn:
    def __init__(self, telemetry: Telemetry, agent: str, inp: TurnInput, started: float) -> None:
        self._tracer = telemetry.tracer
        self._content = telemetry.capture_content
        self._started = started
        self._anchor_ns = time.time_ns()
        self._inp = inp
        attributes: dict[str, AttributeValue] = {
            sc.GEN_AI_OPERATION_NAME: sc.OP_INVOKE_AGENT,
            sc.GEN_AI_PROVIDER_NAME: sc.PROVIDER_VLLM,
            sc.GEN_AI_AGENT_NAME: agent,
            sc.GEN_AI_CONVERSATION_ID: inp.session_id,
            sc.AM_TURN_INDEX: inp.turn_index,
        }
        if inp.forced_lane:
            attributes[sc.AM_LANE] = inp.forced_lane
        if self._content:
            attributes[sc.GEN_AI_INPUT_MESSAGES] = json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": inp.user_message}]}]
            )
        self._span = self._tracer.start_span(
            sc.agent_span(agent),
            context=otel_context.get_current(),
            kind=trace.SpanKind.INTERNAL,
            start_time=self._anchor_ns,
            attributes=attributes,
        )
        self._ctx = trace.set_span_in_context(self._span)
        self._ended = False
        self._escalated = False

    def _ns(self, t: float) -> int:
        return self._anchor_ns + int(max(0.0, t - self._started) * 1e9)

    def _stage_span(self, stage: str, start: float, end: float) -> trace.Span:
        return self._tracer.start_span(
            sc.stage_span(stage),
            context=self._ctx,
            start_time=self._ns(start),
            attributes={sc.AM_STAGE: stage},
        )

    def offered(self, tools: Sequence[str]) -> None:
        self._span.set_attribute(sc.AM_TOOL_COUNT, len(tools))

    def stage(self, stage: str, start: float, end: float) -> None:
        self._stage_span(stage, start, end).end(self._ns(end))

    def llm(
        self,
        stage: str,
        start: float,
        end: float,
        stats: GenerationStats,
        *,
        level: int = 0,
        parse_failures: int = 0,
        first_chunk_s: float | None = None,
    ) -> None:
        parent = self._stage_span(stage, start, end)
        parent.set_attribute(sc.AM_LANE, stats.lane)
        model = stats.model or stats.lane
        attributes: dict[str, AttributeValue] = {
            sc.GEN_AI_OPERATION_NAME: sc.OP_CHAT,
            sc.GEN_AI_PROVIDER_NAME: sc.PROVIDER_VLLM,
            sc.GEN_AI_REQUEST_MODEL: model,
            sc.GEN_AI_RESPONSE_MODEL: model,
            sc.GEN_AI_CONVERSATION_ID: self._inp.session_id,
            sc.GEN_AI_USAGE_INPUT_TOKENS: stats.usage.prompt_tokens,
            sc.GEN_AI_USAGE_OUTPUT_TOKENS: stats.usage.completion_tokens,
            sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: stats.usage.cached_prompt_tokens,
            sc.AM_LANE: stats.lane,
            sc.AM_STAGE: stage,
            sc.AM_ESCALATION_LEVEL: level,
            sc.AM_GENERATIONS: max(1, stats.generations),
            sc.AM_SERVER_TTFT: stats.ttft_s,
        }
        if stats.finish_reason:
            attributes[sc.GEN_AI_RESPONSE_FINISH_REASONS] = (stats.finish_reason.lower(),)
        if first_chunk_s is not None:
            attributes[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = first_chunk_s
        elif stats.ttft_s:
            attributes[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = stats.ttft_s
        if stage == "tool_emit":
            attributes[sc.AM_PARSE_OUTCOME] = "failed" if parse_failures else "ok"
            attributes[sc.AM_PARSE_FAILURES] = parse_failures
        chat = self._tracer.start_span(
            sc.chat_span(model),
            context=trace.set_span_in_context(parent),
            kind=trace.SpanKind.CLIENT,
            start_time=self._ns(start),
            attributes=attributes,
        )
        chat.end(self._ns(end))
        parent.end(self._ns(end))

    def event(self, event: ev.TurnEvent) -> None:
        if isinstance(event, ev.Escalated):
            self._escalated = True
            self._span.add_event(
                "agentmesh.escalation",
                {
                    "agentmesh.escalation.kind": event.kind.value,
                    "agentmesh.escalation.from_lane": event.from_lane,
                    "agentmesh.escalation.to_lane": event.to_lane,
                },
            )
        elif isinstance(event, ev.TurnCompleted):
            span = self._span
            span.set_attribute(sc.AM_TURN_OUTCOME, event.outcome.value)
            span.set_attribute(sc.AM_TOOL_CALLS, event.tool_calls)
            span.set_attribute(sc.AM_ESCALATED, self._escalated)
            span.set_attribute(
                sc.GEN_AI_USAGE_INPUT_TOKENS, sum(u.usage.prompt_tokens for u in event.usage)
            )
            span.set_attribute(
                sc.GEN_AI_USAGE_OUTPUT_TOKENS,
                sum(u.usage.completion_tokens for u in event.usage),
            )
            span.set_attribute(
                sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
                sum(u.usage.cached_prompt_tokens for u in event.usage),
            )
            lanes = tuple(u.lane for u in event.usage)
            if lanes and not self._inp.forced_lane:
                span.set_attribute(sc.AM_LANE, ",".join(lanes))
            if self._content:
                span.set_attribute(
                    sc.GEN_AI_OUTPUT_MESSAGES,
                    json.dumps(
                        [
                            {
                                "role": "assistant",
                                "parts": [{"type": "text", "content": event.answer}],
                            }
                        ]
                    ),
                )
            if event.outcome is ev.Outcome.FAILED:
                span.set_status(trace.Status(trace.StatusCode.ERROR, "turn failed"))
            span.end(self._ns(self._started + event.latency.total))
            self._ended = True

    def close(self) -> None:
        if not self._ended:
            self._span.set_status(trace.Status(trace.StatusCode.ERROR, "turn abandoned"))
            self._span.end()
            self._ended = True
