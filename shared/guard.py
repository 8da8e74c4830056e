"""Owning request decoding: size limit per RPC, undecodable bytes, per-method checks.

grpc decodes a request with the handler's ``request_deserializer`` before any interceptor
code sees it, and an exception there reaches the caller as UNKNOWN carrying the decoder's
text. The guard installs a deserializer that never raises: bytes over the method's limit are
refused unread, a failed decode becomes a :class:`Rejected` value, and the wrapped behaviour
aborts with INVALID_ARGUMENT (our words only) before the handler runs. Then the service's
cheap structural checks (counts, sizes, nesting depth) run on the decoded message, still
before the handler parses anything expensive.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from shared.config import RequestLimits
from shared.errors import AgentmeshError, InvalidArgument, abort_with
from shared.handler_cache import HandlerCache

log = logging.getLogger("agentmesh.guard")

RequestCheck = Callable[[Any], None]
"""Raises a domain error (InvalidArgument naming the field) for a request it refuses."""

RequestChecks = Mapping[str, RequestCheck]
"""Full method name (``/pkg.Service/Method``) -> its check."""

# Reflection's requests are a stream; it is left to grpc (it has no user data of ours).
_UNGUARDED_PREFIXES = ("/grpc.reflection.",)


@dataclass(frozen=True)
class Rejected:
    """Stands in for a request that was refused before (or while) decoding."""

    error: AgentmeshError


def safe_deserializer(
    deserializer: Callable[[bytes], Any] | None, method: str, limit: int
) -> Callable[[bytes], Any]:
    name = method.rsplit("/", 1)[-1]

    def deserialize(data: bytes) -> Any:
        if len(data) > limit:
            return Rejected(
                InvalidArgument(
                    "request",
                    f"{len(data)} bytes is over the {limit}-byte limit of {name}",
                    reason="REQUEST_TOO_LARGE",
                    metadata={"limit_bytes": str(limit)},
                )
            )
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception:
            return Rejected(
                InvalidArgument(
                    "request",
                    "the request bytes are not a valid message of this method "
                    "(malformed protobuf, invalid UTF-8 in a string field or nesting too deep)",
                    reason="UNDECODABLE_REQUEST",
                )
            )

    return deserialize


def _checked(request: Any, check: RequestCheck | None) -> AgentmeshError | None:
    if isinstance(request, Rejected):
        return request.error
    if check is None:
        return None
    try:
        check(request)
    except AgentmeshError as error:
        return error
    except RecursionError:
        return InvalidArgument("request", "nested too deeply", reason="TOO_DEEP")
    return None


def _guard_behaviour(
    behaviour: Callable[..., Any], check: RequestCheck | None
) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            error = _checked(request, check)
            if error is not None:
                await abort_with(context, error)
            async for item in behaviour(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        error = _checked(request, check)
        if error is not None:
            await abort_with(context, error)
        result = behaviour(request, context)
        if inspect.isawaitable(result):
            return await result
        return result

    return unary


class RequestGuardInterceptor(grpc.aio.ServerInterceptor):
    """Innermost interceptor: it sees the generated handler and owns its deserializer."""

    def __init__(self, limits: RequestLimits, checks: RequestChecks | None = None) -> None:
        self._limits = limits
        self._checks = dict(checks or {})
        self._guarded = HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNGUARDED_PREFIXES):
            return handler
        if handler.request_streaming:
            return handler  # none of our RPCs stream requests
        return self._guarded.get(method, handler, lambda inner: self._guard(inner, method))

    def _guard(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        deserializer = safe_deserializer(
            handler.request_deserializer, method, self._limits.request_bytes_limit(method)
        )
        check = self._checks.get(method)
        kwargs: dict[str, Any] = {
            "request_deserializer": deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guard_behaviour(handler.unary_unary, check), **kwargs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _guard_behaviour(handler.unary_stream, check), **kwargs
            )
        return handler
