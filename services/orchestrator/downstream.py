"""What both adapters of the loop's ports share: the gRPC clients (clients.py) and the
in-process one (inprocess.py).

The requests the inference and tools services take, built from the loop's values; their
replies read back into the loop's values; and the rule for retrying a call a full lane
refused. The in-process adapter hands the same request messages to the services' cores that
the gRPC adapter sends over the wire, so both paths run the same conversions; both are
written over services/orchestrator/adapters.py, which holds the port methods once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2
from agentmesh.tools.v1 import tools_pb2
from google.protobuf import duration_pb2

from services.orchestrator.loop.types import (
    CallToolsResult,
    ComposeDelta,
    ComposeDone,
    Decoding,
    Effect,
    EmittedCall,
    GenerateResult,
    GenerationStats,
    LaneRequest,
    Message,
    Role,
    TokenCount,
    ToolCall,
    ToolCallsChosen,
    ToolDef,
    ToolInvocation,
    ToolOutcome,
    Usage,
)
from shared.deadlines import Deadline

T = TypeVar("T")

INFERENCE_SERVICE = "agentmesh.inference.v1.InferenceService"
TOOLS_SERVICE = "agentmesh.tools.v1.ToolService"
# How the loop's errors name them.
INFERENCE = "the inference service"
TOOLS = "the tool service"


def method(service: str, name: str) -> str:
    """The full method name (``/pkg.Service/Method``) the request checks are keyed by."""
    return f"/{service}/{name}"


_TOOL_CHOICE = {
    "auto": inference_pb2.ToolChoice.MODE_AUTO,
    "required": inference_pb2.ToolChoice.MODE_REQUIRED,
}
_ROLES = {
    Role.SYSTEM: common_pb2.ROLE_SYSTEM,
    Role.USER: common_pb2.ROLE_USER,
    Role.ASSISTANT: common_pb2.ROLE_ASSISTANT,
    Role.TOOL: common_pb2.ROLE_TOOL,
}
_STAGES = {
    "plan": common_pb2.STAGE_PLAN,
    "tool_call": common_pb2.STAGE_TOOL_CALL,
    "compose": common_pb2.STAGE_COMPOSE,
}


# ---------------------------------------------------------------------- values


def message_to_proto(message: Message) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(
        role=_ROLES[message.role],
        content=message.content,
        tool_calls=[
            common_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json)
            for c in message.tool_calls
        ],
        tool_call_id=message.tool_call_id,
        name=message.name,
    )


def tool_to_proto(tool: ToolDef) -> common_pb2.ToolSpec:
    return common_pb2.ToolSpec(
        name=tool.name,
        description=tool.description,
        parameters_json_schema=tool.parameters_json_schema,
        effect=common_pb2.TOOL_EFFECT_WRITE
        if tool.effect is Effect.WRITE
        else common_pb2.TOOL_EFFECT_READ,
        timeout_ms=tool.timeout_ms,
        principal_arguments=list(tool.principal_arguments),
        requires_customer=tool.requires_customer,
    )


def tool_from_proto(spec: common_pb2.ToolSpec) -> ToolDef:
    return ToolDef(
        name=spec.name,
        description=spec.description,
        parameters_json_schema=spec.parameters_json_schema,
        effect=Effect.WRITE if spec.effect == common_pb2.TOOL_EFFECT_WRITE else Effect.READ,
        timeout_ms=spec.timeout_ms,
        principal_arguments=tuple(spec.principal_arguments),
        requires_customer=spec.requires_customer,
    )


def emitted_from_proto(calls: Sequence[inference_pb2.EmittedToolCall]) -> tuple[EmittedCall, ...]:
    return tuple(
        EmittedCall(
            call=ToolCall(c.call.id, c.call.name, c.call.arguments_json),
            ok=c.outcome == inference_pb2.PARSE_OUTCOME_OK,
            parse_error=c.parse_error,
            raw_text=c.raw_text,
        )
        for c in calls
    )


def lane_to_proto(lane: LaneRequest) -> inference_pb2.LaneSelector:
    return inference_pb2.LaneSelector(
        lane=lane.lane,
        stage=_STAGES.get(lane.stage, common_pb2.STAGE_UNSPECIFIED),
        escalation_level=lane.escalation_level,
    )


def _seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def _usage(value: common_pb2.Usage) -> Usage:
    return Usage(value.prompt_tokens, value.completion_tokens, value.cached_prompt_tokens)


def _finish(value: int) -> str:
    return inference_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_")  # type: ignore[arg-type]


def _generation_stats(
    value: inference_pb2.GenerateResponse | inference_pb2.GenerationSummary,
) -> GenerationStats:
    """Stats of one generation: a Generate reply and a stream's summary carry the same fields."""
    return GenerationStats(
        lane=value.lane.lane,
        model=value.lane.model,
        usage=_usage(value.usage),
        ttft_s=_seconds(value.time_to_first_token),
        elapsed_s=_seconds(value.elapsed),
        generations=1,
        finish_reason=_finish(value.finish_reason),
    )


# ---------------------------------------------------------------------- inference


def generate_request(
    messages: Sequence[Message],
    tools: Sequence[ToolDef],
    lane: LaneRequest,
    *,
    json_schema: str,
    max_tokens: int,
) -> inference_pb2.GenerateRequest:
    """The plan: one generation whose output matches ``json_schema``."""
    return inference_pb2.GenerateRequest(
        messages=[message_to_proto(m) for m in messages],
        lane=lane_to_proto(lane),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens),
        tools=[tool_to_proto(t) for t in tools],
        response_format=inference_pb2.ResponseFormat(json_schema=json_schema),
    )


def generate_result(response: inference_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(text=response.text, stats=_generation_stats(response))


def call_tools_request(
    messages: Sequence[Message],
    tools: Sequence[ToolDef],
    names: Sequence[str],
    lane: LaneRequest,
    *,
    parallel: bool,
    decoding: Decoding,
    max_tokens: int | None,
) -> inference_pb2.CallToolsRequest:
    """One call per tool in ``names`` (tool choice NAMED)."""
    return inference_pb2.CallToolsRequest(
        messages=[message_to_proto(m) for m in messages],
        tools=[tool_to_proto(t) for t in tools],
        tool_choice=inference_pb2.ToolChoice(
            mode=inference_pb2.ToolChoice.MODE_NAMED, names=list(names)
        ),
        max_calls=len(names),
        lane=lane_to_proto(lane),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens)
        if max_tokens
        else inference_pb2.SamplingParams(),
        parallel=parallel,
        decoding=inference_pb2.DECODING_MODE_UNCONSTRAINED
        if decoding is Decoding.UNCONSTRAINED
        else inference_pb2.DECODING_MODE_CONSTRAINED,
    )


def call_tools_result(response: inference_pb2.CallToolsResponse) -> CallToolsResult:
    return CallToolsResult(
        calls=emitted_from_proto(response.calls),
        stats=GenerationStats(
            lane=response.lane.lane,
            model=response.lane.model,
            usage=_usage(response.usage),
            elapsed_s=_seconds(response.elapsed),
            generations=max(1, response.generations),
        ),
    )


def stream_request(
    messages: Sequence[Message],
    tools: Sequence[ToolDef],
    lane: LaneRequest,
    *,
    tool_choice: str,
    max_calls: int,
    max_tokens: int,
) -> inference_pb2.StreamGenerateRequest:
    """Continue or answer: ``tool_choice`` "none" (text only), "auto" or "required"."""
    mode = _TOOL_CHOICE.get(tool_choice)
    return inference_pb2.StreamGenerateRequest(
        messages=[message_to_proto(m) for m in messages],
        lane=lane_to_proto(lane),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens),
        tools=[tool_to_proto(t) for t in tools],
        tool_choice=inference_pb2.ToolChoice(mode=mode) if mode else None,
        max_calls=max_calls if mode else 0,
    )


def answer_item(
    response: inference_pb2.StreamGenerateResponse,
) -> ComposeDelta | ToolCallsChosen | ComposeDone | None:
    """One streamed reply as the loop's item (None: an empty delta)."""
    if response.HasField("summary"):
        return ComposeDone(_generation_stats(response.summary))
    if response.HasField("tool_calls"):
        return ToolCallsChosen(emitted_from_proto(response.tool_calls.calls))
    if response.text_delta:
        return ComposeDelta(response.text_delta)
    return None


def count_tokens_request(
    messages: Sequence[Message],
    tools: Sequence[ToolDef],
    lane: LaneRequest,
    *,
    texts: Sequence[str],
    truncate_to: int,
) -> inference_pb2.CountTokensRequest:
    return inference_pb2.CountTokensRequest(
        messages=[message_to_proto(m) for m in messages],
        tools=[tool_to_proto(t) for t in tools],
        lane=lane_to_proto(lane),
        texts=list(texts),
        truncate_texts_to=truncate_to,
    )


def token_count(response: inference_pb2.CountTokensResponse) -> TokenCount:
    return TokenCount(
        prompt_tokens=response.prompt_tokens,
        max_model_len=response.max_model_len,
        message_tokens=tuple(response.message_tokens),
        text_tokens=tuple(t.tokens for t in response.texts),
        truncated_texts=tuple(t.truncated_text if t.truncated else None for t in response.texts),
    )


# ---------------------------------------------------------------------- tools


def tools_listed(response: tools_pb2.ListToolsResponse) -> list[ToolDef]:
    return [tool_from_proto(t) for t in response.tools]


def execute_tools_request(invocations: Sequence[ToolInvocation]) -> tools_pb2.ExecuteToolsRequest:
    return tools_pb2.ExecuteToolsRequest(
        invocations=[
            tools_pb2.ToolInvocation(
                call_id=i.call_id,
                name=i.name,
                arguments_json=i.arguments_json,
                idempotency_key=i.idempotency_key,
                timeout_ms=i.timeout_ms,
            )
            for i in invocations
        ]
    )


def tool_outcomes(response: tools_pb2.ExecuteToolsResponse) -> list[ToolOutcome]:
    return [
        ToolOutcome(
            call_id=r.call_id,
            name=r.name,
            status=tools_pb2.ToolResultStatus.Name(r.status).removeprefix(  # type: ignore[arg-type]
                "TOOL_RESULT_STATUS_"
            ),
            error_message=r.error_message,
            result_json=r.result_json,
            fenced_result=r.fenced_result,
            truncated=r.truncated,
            latency_s=_seconds(r.latency),
            source=r.source,
            replayed=r.replayed,
        )
        for r in response.results
    ]


# ---------------------------------------------------------------------- a full lane

# A lane at its concurrency cap answers RESOURCE_EXHAUSTED with a retry hint: wait that long
# and try again while the turn's deadline leaves room for a useful attempt.
CAPACITY_ATTEMPTS = 10
MIN_USEFUL_ATTEMPT_S = 0.5


def capacity_delay(hint_s: float | None, attempt: int, deadline: Deadline) -> float | None:
    """The wait before attempt ``attempt + 1`` of a call a full lane refused with the retry
    hint ``hint_s``; None: give up (no hint, attempts used up, or too little of the deadline
    left after the wait)."""
    room = deadline.time_remaining() - MIN_USEFUL_ATTEMPT_S
    if hint_s is None or attempt >= CAPACITY_ATTEMPTS or hint_s > room:
        return None
    return hint_s


async def retry_capacity(
    attempt: Callable[[float], Awaitable[T]],
    timeout_s: float,
    hint_of: Callable[[Exception], float | None],
) -> T:
    """``attempt(seconds left)`` until it returns, retrying an error ``hint_of`` reads a
    retry hint from (a full lane) after that hint; any other error is raised as it is."""
    deadline = Deadline.after(timeout_s)
    for n in range(1, CAPACITY_ATTEMPTS + 1):
        try:
            return await attempt(max(deadline.time_remaining(), 0.001))
        except Exception as error:
            delay = capacity_delay(hint_of(error), n, deadline)
            if delay is None:
                raise
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")
