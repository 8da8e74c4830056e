"""gRPC adapters implementing the loop's ports over the inference and tools services.

Each call gets the loop's ``timeout_s`` as its gRPC deadline. If the awaiting task is
cancelled (client disconnect), the call is cancelled too, so the inference service aborts the
engine request and the tools service cancels pending tool calls. Requests are built and
replies read by services/orchestrator/downstream.py, which the in-process adapter
(services/orchestrator/inprocess.py) shares; the port methods are written once in
services/orchestrator/adapters.py, these classes only make the calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.orchestrator.adapters import InferenceAdapter, Metadata, ToolsAdapter
from services.orchestrator.downstream import (
    INFERENCE,
    INFERENCE_SERVICE,
    TOOLS,
    TOOLS_SERVICE,
    capacity_delay,
    retry_capacity,
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

# Side-effect free, so safe to retry on UNAVAILABLE. ExecuteTools too: every write in it
# carries an idempotency key, so a retried batch never moves money twice.
INFERENCE_RETRY_METHODS: list[tuple[str, str | None]] = [
    (INFERENCE_SERVICE, "Generate"),
    (INFERENCE_SERVICE, "CallTools"),
    (INFERENCE_SERVICE, "ListLanes"),
    (INFERENCE_SERVICE, "CountTokens"),
]
TOOLS_RETRY_METHODS: list[tuple[str, str | None]] = [
    (TOOLS_SERVICE, "ListTools"),
    (TOOLS_SERVICE, "ExecuteTools"),
]

__all__ = [
    "INFERENCE_RETRY_METHODS",
    "INFERENCE_SERVICE",
    "PRINCIPAL_HEADER",
    "TOOLS_RETRY_METHODS",
    "TOOLS_SERVICE",
    "GrpcInference",
    "GrpcTools",
    "domain_error",
    "retry_after",
]


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


def _hint(error: Exception) -> float | None:
    return retry_after(error) if isinstance(error, grpc.aio.AioRpcError) else None


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


async def _unary(start: Callable[[float], Any], timeout_s: float, what: str) -> Any:
    """Runs a unary call, ``start(timeout)`` per attempt, retrying a full lane on its hint.

    Cancelling the awaiting task cancels the RPC in flight.
    """

    async def attempt(timeout: float) -> Any:
        call = start(timeout)
        try:
            return await call
        except asyncio.CancelledError:
            call.cancel()
            raise

    try:
        return await retry_capacity(attempt, timeout_s, _hint)
    except grpc.aio.AioRpcError as error:
        raise domain_error(error, what) from None


async def _chain(first: Any, call: Any) -> AsyncIterator[Any]:
    """The stream's first message (already read; EOF for an empty stream) and the rest."""
    message = first
    while message is not grpc.aio.EOF:
        yield message
        message = await call.read()


# ---------------------------------------------------------------------- ports


class GrpcInference(InferenceAdapter):
    """InferencePort over InferenceService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)

    async def _generate(
        self, request: inference_pb2.GenerateRequest, timeout_s: float
    ) -> inference_pb2.GenerateResponse:
        response: inference_pb2.GenerateResponse = await _unary(
            lambda t: self._stub.Generate(request, timeout=t), timeout_s, INFERENCE
        )
        return response

    async def _call_tools(
        self, request: inference_pb2.CallToolsRequest, timeout_s: float
    ) -> inference_pb2.CallToolsResponse:
        response: inference_pb2.CallToolsResponse = await _unary(
            lambda t: self._stub.CallTools(request, timeout=t), timeout_s, INFERENCE
        )
        return response

    async def _stream_generate(
        self, request: inference_pb2.StreamGenerateRequest, timeout_s: float
    ) -> AsyncGenerator[inference_pb2.StreamGenerateResponse, None]:
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
                    delay = capacity_delay(retry_after(error), attempt, deadline)
                    if delay is None:
                        raise
                    attempt += 1
                    await asyncio.sleep(delay)
                    call = self._stub.StreamGenerate(
                        request, timeout=max(deadline.time_remaining(), 0.001)
                    )
            async for response in _chain(first, call):
                yield response
        except grpc.aio.AioRpcError as error:
            raise domain_error(error, INFERENCE) from None
        finally:
            # A no-op once the stream ended; aborts the engine request otherwise.
            call.cancel()

    async def _count_tokens(
        self, request: inference_pb2.CountTokensRequest, timeout_s: float
    ) -> inference_pb2.CountTokensResponse:
        response: inference_pb2.CountTokensResponse = await _unary(
            lambda t: self._stub.CountTokens(request, timeout=t), timeout_s, INFERENCE
        )
        return response


class GrpcTools(ToolsAdapter):
    """ToolsPort over ToolService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tools_pb2_grpc.ToolServiceStub(channel)

    async def _list_tools(self, timeout_s: float) -> tools_pb2.ListToolsResponse:
        response: tools_pb2.ListToolsResponse = await _unary(
            lambda t: self._stub.ListTools(tools_pb2.ListToolsRequest(), timeout=t),
            timeout_s,
            TOOLS,
        )
        return response

    async def _execute_tools(
        self, request: tools_pb2.ExecuteToolsRequest, metadata: Metadata, timeout_s: float
    ) -> tools_pb2.ExecuteToolsResponse:
        response: tools_pb2.ExecuteToolsResponse = await _unary(
            lambda t: self._stub.ExecuteTools(request, timeout=t, metadata=metadata),
            timeout_s,
            TOOLS,
        )
        return response
