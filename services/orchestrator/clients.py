"""gRPC adapters implementing the loop's ports over the inference and tools services.

Each call gets the loop's ``timeout_s`` as its gRPC deadline. If the awaiting task is
cancelled (client disconnect), the call is cancelled too, so the inference service aborts the
engine request and the tools service cancels pending tool calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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
    Principal,
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
from shared.errors import (
    AgentmeshError,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from shared.principal_wire import PRINCIPAL_HEADER

INFERENCE_SERVICE = "agentmesh.inference.v1.InferenceService"
TOOLS_SERVICE = "agentmesh.tools.v1.ToolService"
# Side-effect free, so safe to retry on UNAVAILABLE. ExecuteTools too: every write in it
# carries an idempotency key, so a retried batch never moves money twice.
INFERENCE_RETRY_METHODS: list[tuple[str, str | None]] = [
    (INFERENCE_SERVICE, "Generate"),
    (INFERENCE_SERVICE, "CallTools"),
    (INFERENCE_SERVICE, "ListLanes"),
    (INFERENCE_SERVICE, "CountTokens"),
]
_TOOL_CHOICE = {
    "auto": inference_pb2.ToolChoice.MODE_AUTO,
    "required": inference_pb2.ToolChoice.MODE_REQUIRED,
}
TOOLS_RETRY_METHODS: list[tuple[str, str | None]] = [
    (TOOLS_SERVICE, "ListTools"),
    (TOOLS_SERVICE, "ExecuteTools"),
]

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


# ---------------------------------------------------------------------- conversions


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


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay a RESOURCE_EXHAUSTED status carries (None: no hint)."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            seconds: float = info.retry_delay.ToNanoseconds() / 1e9
            return max(0.0, seconds)
    return None


def domain_error(error: grpc.aio.AioRpcError, what: str) -> AgentmeshError:
    """A downstream status as our own error (the downstream's text stays out, except the
    field-level messages our own services write for bad arguments)."""
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what} did not answer in time")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint = retry_after(error)
        return ResourceExhausted(
            f"{what} is at capacity", retry_after_s=1.0 if hint is None else hint
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(what, error.details() or "rejected the request")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: not found")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(f"{what}: failed precondition")
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(f"{what} was cancelled")
    return Unavailable(f"{what} is unavailable")


# A lane at its concurrency cap answers RESOURCE_EXHAUSTED with a retry hint: wait that long
# and try again while the turn's deadline leaves room for a useful attempt.
CAPACITY_ATTEMPTS = 10
MIN_USEFUL_ATTEMPT_S = 0.5


async def _unary(start: Callable[[float], Any], timeout_s: float, what: str) -> Any:
    """Runs a unary call, ``start(timeout)`` per attempt, retrying a full lane on its hint.

    Cancelling the awaiting task cancels the RPC in flight.
    """
    deadline = Deadline.after(timeout_s)
    for attempt in range(1, CAPACITY_ATTEMPTS + 1):
        call = start(max(deadline.time_remaining(), 0.001))
        try:
            return await call
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as error:
            delay = _capacity_delay(error, attempt, deadline)
            if delay is None:
                raise domain_error(error, what) from None
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _capacity_delay(error: grpc.aio.AioRpcError, attempt: int, deadline: Deadline) -> float | None:
    """The wait before attempt ``attempt + 1`` of a call a full lane refused; None: give up
    (no hint, attempts used up, or too little of the deadline left after the wait)."""
    delay = retry_after(error)
    room = deadline.time_remaining() - MIN_USEFUL_ATTEMPT_S
    if delay is None or attempt >= CAPACITY_ATTEMPTS or delay > room:
        return None
    return delay


async def _chain(first: Any, call: Any) -> AsyncIterator[Any]:
    """The stream's first message (already read; EOF for an empty stream) and the rest."""
    message = first
    while message is not grpc.aio.EOF:
        yield message
        message = await call.read()


# ---------------------------------------------------------------------- ports


class GrpcInference:
    """InferencePort over InferenceService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)

    async def plan(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        json_schema: str,
        max_tokens: int,
        timeout_s: float,
    ) -> GenerateResult:
        request = inference_pb2.GenerateRequest(
            messages=[message_to_proto(m) for m in messages],
            lane=lane_to_proto(lane),
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens),
            tools=[tool_to_proto(t) for t in tools],
            response_format=inference_pb2.ResponseFormat(json_schema=json_schema),
        )
        response: inference_pb2.GenerateResponse = await _unary(
            lambda t: self._stub.Generate(request, timeout=t), timeout_s, "the inference service"
        )
        return GenerateResult(text=response.text, stats=_generation_stats(response))

    async def emit_tool_calls(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        names: Sequence[str],
        lane: LaneRequest,
        *,
        parallel: bool,
        decoding: Decoding,
        max_tokens: int | None,
        timeout_s: float,
    ) -> CallToolsResult:
        request = inference_pb2.CallToolsRequest(
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
        response: inference_pb2.CallToolsResponse = await _unary(
            lambda t: self._stub.CallTools(request, timeout=t), timeout_s, "the inference service"
        )
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

    async def answer(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        tool_choice: str,
        max_calls: int,
        max_tokens: int,
        timeout_s: float,
    ) -> AsyncGenerator[ComposeDelta | ToolCallsChosen | ComposeDone, None]:
        mode = _TOOL_CHOICE.get(tool_choice)
        request = inference_pb2.StreamGenerateRequest(
            messages=[message_to_proto(m) for m in messages],
            lane=lane_to_proto(lane),
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens),
            tools=[tool_to_proto(t) for t in tools],
            tool_choice=inference_pb2.ToolChoice(mode=mode) if mode else None,
            max_calls=max_calls if mode else 0,
        )
        deadline = Deadline.after(timeout_s)
        attempt = 1
        call = self._stub.StreamGenerate(request, timeout=timeout_s)
        try:
            while True:
                try:
                    first = await call.read()
                    break
                except grpc.aio.AioRpcError as error:
                    # Refused before the first token (the engine's budget is full): like the
                    # unary calls, wait the hint and retry while the deadline has room.
                    delay = _capacity_delay(error, attempt, deadline)
                    if delay is None:
                        raise
                    attempt += 1
                    await asyncio.sleep(delay)
                    call = self._stub.StreamGenerate(
                        request, timeout=max(deadline.time_remaining(), 0.001)
                    )
            async for response in _chain(first, call):
                if response.HasField("summary"):
                    yield ComposeDone(_generation_stats(response.summary))
                elif response.HasField("tool_calls"):
                    yield ToolCallsChosen(emitted_from_proto(response.tool_calls.calls))
                elif response.text_delta:
                    yield ComposeDelta(response.text_delta)
        except grpc.aio.AioRpcError as error:
            raise domain_error(error, "the inference service") from None
        finally:
            # A no-op once the stream ended; aborts the engine request otherwise.
            call.cancel()

    async def count_tokens(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        texts: Sequence[str] = (),
        truncate_to: int = 0,
        timeout_s: float,
    ) -> TokenCount:
        request = inference_pb2.CountTokensRequest(
            messages=[message_to_proto(m) for m in messages],
            tools=[tool_to_proto(t) for t in tools],
            lane=lane_to_proto(lane),
            texts=list(texts),
            truncate_texts_to=truncate_to,
        )
        response: inference_pb2.CountTokensResponse = await _unary(
            lambda t: self._stub.CountTokens(request, timeout=t),
            timeout_s,
            "the inference service",
        )
        return TokenCount(
            prompt_tokens=response.prompt_tokens,
            max_model_len=response.max_model_len,
            message_tokens=tuple(response.message_tokens),
            text_tokens=tuple(t.tokens for t in response.texts),
            truncated_texts=tuple(
                t.truncated_text if t.truncated else None for t in response.texts
            ),
        )


class GrpcTools:
    """ToolsPort over ToolService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tools_pb2_grpc.ToolServiceStub(channel)

    async def list_tools(self, *, timeout_s: float) -> list[ToolDef]:
        response: tools_pb2.ListToolsResponse = await _unary(
            lambda t: self._stub.ListTools(tools_pb2.ListToolsRequest(), timeout=t),
            timeout_s,
            "the tool service",
        )
        return [tool_from_proto(t) for t in response.tools]

    async def execute(
        self,
        invocations: Sequence[ToolInvocation],
        *,
        principal: Principal,
        timeout_s: float,
    ) -> list[ToolOutcome]:
        request = tools_pb2.ExecuteToolsRequest(
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
        response: tools_pb2.ExecuteToolsResponse = await _unary(
            lambda t: self._stub.ExecuteTools(
                request, timeout=t, metadata=((PRINCIPAL_HEADER, principal.header()),)
            ),
            timeout_s,
            "the tool service",
        )
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
