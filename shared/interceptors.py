"""Server interceptors: tracing (request ids), metrics, auth, deadlines, error mapping,
request guard (decoding and limits).

Each interceptor wraps the behaviour of every RPC of the agentmesh services (health and
reflection pass through untouched) in an async context manager, whatever the RPC's shape
(unary or streaming, coroutine or async generator). Order in the chain: first is outermost.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc.aio import AbortError

from shared.deadlines import Deadline, reset_current_deadline, set_current_deadline
from shared.errors import AgentmeshError, abort_with
from shared.guard import RequestGuardInterceptor
from shared.handler_cache import HandlerCache
from shared.logging import reset_request_id, set_request_id
from shared.metrics import RpcMetrics

if TYPE_CHECKING:
    from shared.auth import Authenticator

log = logging.getLogger("agentmesh.rpc")

EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
REQUEST_ID_HEADER = "x-request-id"

# Codes a failed downstream call keeps when it surfaces through our handler; anything else
# becomes INTERNAL. The downstream's message is never forwarded.
_PROPAGATED_DOWNSTREAM_CODES = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    _, service, method = full_method.split("/", 2)
    return service, method


def metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


class WrappingInterceptor:
    """One member of an :class:`InterceptorChain`: :meth:`around` wraps one RPC. Members
    build no handlers of their own; the chain wraps each method once for all of them."""

    def around(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def exempt(self, method: str) -> bool:
        """Methods passed through unwrapped (health and reflection, unless overridden)."""
        return method.startswith(EXEMPT_PREFIXES)


def _wrap_behaviour(
    behaviour: Callable[..., Any],
    method: str,
    around: Callable[
        [str, grpc.aio.ServicerContext[Any, Any]], contextlib.AbstractAsyncContextManager[None]
    ],
) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream_wrapper(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with around(method, context):
                async for item in behaviour(request, context):
                    yield item

        return stream_wrapper

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with around(method, context):
            return await behaviour(request, context)

    return wrapper


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    method: str,
    around: Callable[
        [str, grpc.aio.ServicerContext[Any, Any]], contextlib.AbstractAsyncContextManager[None]
    ],
) -> grpc.RpcMethodHandler[Any, Any]:
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_behaviour(handler.unary_unary, method, around), **kwargs
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_behaviour(handler.unary_stream, method, around), **kwargs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_behaviour(handler.stream_unary, method, around), **kwargs
        )
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_behaviour(handler.stream_stream, method, around), **kwargs
        )
    return handler


class DrainInterceptor(WrappingInterceptor):
    """Counts in-flight RPCs; once draining, refuses new ones with UNAVAILABLE.

    grpc-core's own shutdown answers late callers with CANCELLED, which clients must not
    retry blindly; UNAVAILABLE tells them to go to another replica.
    """

    def __init__(self) -> None:
        self._in_flight = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start_draining(self) -> None:
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """True when every in-flight RPC finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


class TracingInterceptor(WrappingInterceptor):
    """Gives every RPC a request id (the caller's ``x-request-id`` or a new one) for logs.

    The seam where OpenTelemetry server spans go.
    """

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        request_id = metadata_value(context, REQUEST_ID_HEADER) or uuid.uuid4().hex[:16]
        token = set_request_id(request_id)
        started = time.perf_counter()
        try:
            yield
        finally:
            log.debug(
                "rpc done", extra={"method": method, "seconds": time.perf_counter() - started}
            )
            reset_request_id(token)


class MetricsInterceptor(WrappingInterceptor):
    """Counts RPCs by final status code and observes their latency."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        service, name = split_method(method)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except AbortError:
            code = _context_code(context) or grpc.StatusCode.UNKNOWN
            raise
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._metrics.requests.labels(service, name, code.name).inc()
            self._metrics.latency.labels(service, name).observe(time.perf_counter() - started)


def _context_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    with contextlib.suppress(Exception):
        value = context.code()
        if isinstance(value, grpc.StatusCode):
            return value
        if isinstance(value, int):
            for code in grpc.StatusCode:
                if code.value[0] == value:
                    return code
    return None


class DeadlineInterceptor(WrappingInterceptor):
    """Publishes the caller's deadline so code below can pass it downstream."""

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        remaining = context.time_remaining()
        deadline = Deadline.after(remaining) if remaining is not None else None
        token = set_current_deadline(deadline)
        try:
            yield
        finally:
            reset_current_deadline(token)


class ErrorInterceptor(WrappingInterceptor):
    """Domain errors -> their status with details; anything else -> INTERNAL, text hidden."""

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        try:
            yield
        except AgentmeshError as error:
            await abort_with(context, error)
        except AbortError:
            raise
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code not in _PROPAGATED_DOWNSTREAM_CODES:
                log.error("downstream call failed in %s: %s", method, code.name)
                code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"downstream call failed: {error.code().name}")
        except NotImplementedError:
            # The generated base servicer's answer for an RPC this build does not implement.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
        except Exception:
            log.exception("unhandled error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class InterceptorChain(grpc.aio.ServerInterceptor):
    """Several wrapping interceptors as ONE wrapper per method: each call enters their
    ``around`` in order (first outermost) in one exit stack, and a streamed response passes
    through one generator layer instead of one per interceptor. Exceptions unwind through
    them innermost first, exactly as if they were nested. A method every member exempts
    passes through unwrapped."""

    def __init__(self, members: list[WrappingInterceptor]) -> None:
        self.members = list(members)
        self._built = HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return self._built.get(method, handler, lambda inner: self._wrap(inner, method))

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # The members that wrap this method (each may exempt methods of its own).
        active = tuple(m for m in self.members if not m.exempt(method))
        if not active:
            return handler

        @contextlib.asynccontextmanager
        async def around(
            method: str, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[None]:
            async with contextlib.AsyncExitStack() as stack:
                for member in active:
                    await stack.enter_async_context(member.around(method, context))
                yield

        return wrap_handler(handler, method, around)


def default_interceptors(
    metrics: RpcMetrics,
    drain: DrainInterceptor,
    authenticator: Authenticator | None = None,
    guard: RequestGuardInterceptor | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The standard chain, outermost first: drain, tracing, metrics, auth, deadline and
    errors as one :class:`InterceptorChain` (one wrapper per method), then the guard,
    innermost: it owns decoding."""
    members: list[WrappingInterceptor] = [drain, TracingInterceptor(), MetricsInterceptor(metrics)]
    if authenticator is not None and authenticator.enabled:
        from shared.auth import AuthInterceptor  # auth builds on this module

        members.append(AuthInterceptor(authenticator))
    members += [DeadlineInterceptor(), ErrorInterceptor()]
    chain: list[grpc.aio.ServerInterceptor] = [InterceptorChain(members)]
    if guard is not None:
        chain.append(guard)
    return chain
