"""Interceptor wrappers are built once per method: the same inner handler gets the same
wrapper on every call; a different inner handler (or method) gets its own. Only the chain
and the request guard build handlers; the chain's members only wrap calls."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from shared import guard as guard_module
from shared import interceptors
from shared.auth import Authenticator, AuthInterceptor
from shared.config import AuthSettings, RequestLimits
from shared.guard import RequestGuardInterceptor
from shared.interceptors import (
    DrainInterceptor,
    InterceptorChain,
    WrappingInterceptor,
    default_interceptors,
)
from shared.metrics import RpcMetrics


class _Counting(WrappingInterceptor):
    def __init__(self) -> None:
        self.entered: list[str] = []

    @contextlib.asynccontextmanager
    async def around(self, method: str, context: Any) -> AsyncIterator[None]:
        self.entered.append(method)
        yield


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def _echo(request: Any, context: Any) -> Any:
    return request


async def test_wrapper_is_built_once_per_method() -> None:
    counting = _Counting()
    interceptor = InterceptorChain([counting])
    inner = grpc.unary_unary_rpc_method_handler(_echo)
    other = grpc.unary_unary_rpc_method_handler(_echo)

    async def same(_: Any) -> Any:
        return inner

    async def different(_: Any) -> Any:
        return other

    first = await interceptor.intercept_service(same, _Details("/pkg.Svc/A"))
    second = await interceptor.intercept_service(same, _Details("/pkg.Svc/A"))
    assert first is not None and first is second and first is not inner
    assert await interceptor.intercept_service(same, _Details("/pkg.Svc/B")) is not first
    rebuilt = await interceptor.intercept_service(different, _Details("/pkg.Svc/A"))
    assert rebuilt is not None and rebuilt is not first
    # The cached wrapper still runs the interceptor on every call.
    assert await first.unary_unary("x", None) == "x"
    assert await first.unary_unary("y", None) == "y"
    assert counting.entered == ["/pkg.Svc/A", "/pkg.Svc/A"]
    # A method every member exempts (health) is passed through as it is.
    assert (
        await interceptor.intercept_service(same, _Details("/grpc.health.v1.Health/Check")) is inner
    )


def _chain(
    interceptors: list[grpc.aio.ServerInterceptor], inner: grpc.RpcMethodHandler[Any, Any]
) -> Any:
    """What grpc's server does per call: each interceptor's continuation is the next one."""

    async def run(index: int, details: Any) -> Any:
        if index == len(interceptors):
            return inner

        async def continuation(d: Any) -> Any:
            return await run(index + 1, d)

        return await interceptors[index].intercept_service(continuation, details)

    return run


def _default_chain() -> list[grpc.aio.ServerInterceptor]:
    authenticator = Authenticator(AuthSettings(), "secret")
    assert authenticator.enabled
    guard = RequestGuardInterceptor(RequestLimits())
    return default_interceptors(
        RpcMetrics(CollectorRegistry()), DrainInterceptor(), authenticator, guard
    )


async def test_the_whole_default_chain_is_built_once_per_method() -> None:
    """Auth and the request guard sit in the chain too: if either rebuilt its handler per
    call, every interceptor above it would miss its cache and wrap afresh on every call."""
    chain = _default_chain()
    assert [type(i) for i in chain] == [InterceptorChain, RequestGuardInterceptor]
    members = chain[0].members  # type: ignore[attr-defined]
    assert [type(m).__name__ for m in members] == [
        "DrainInterceptor",
        "TracingInterceptor",
        "MetricsInterceptor",
        "AuthInterceptor",
        "DeadlineInterceptor",
        "ErrorInterceptor",
    ]
    assert isinstance(members[3], AuthInterceptor)
    run = _chain(chain, grpc.unary_unary_rpc_method_handler(_echo))
    first = await run(0, _Details("/pkg.Svc/A"))
    assert first is not None
    assert await run(0, _Details("/pkg.Svc/A")) is first
    assert await run(0, _Details("/pkg.Svc/B")) is not first


async def test_a_real_server_wraps_each_method_once(monkeypatch: Any) -> None:
    built: list[str] = []
    real_wrap = interceptors.wrap_handler
    real_guard = guard_module.safe_deserializer

    def counting_wrap(handler: Any, method: str, around: Any) -> Any:
        built.append(method)
        return real_wrap(handler, method, around)

    def counting_guard(deserializer: Any, method: str, limit: int) -> Any:
        built.append(method)
        return real_guard(deserializer, method, limit)

    monkeypatch.setattr(interceptors, "wrap_handler", counting_wrap)
    monkeypatch.setattr(guard_module, "safe_deserializer", counting_guard)

    async def say(request: bytes, context: Any) -> bytes:
        return request

    method = "/agentmesh.test.v1.Echo/Say"
    server = grpc.aio.server(interceptors=_default_chain())
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "agentmesh.test.v1.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(method)
            metadata = (("authorization", "Bearer secret"),)
            assert await call(b"one", metadata=metadata, timeout=10) == b"one"
            once = len(built)
            assert await call(b"two", metadata=metadata, timeout=10) == b"two"
            assert await call(b"three", metadata=metadata, timeout=10) == b"three"
    finally:
        await server.stop(None)
    # One wrapper for drain, tracing, metrics, auth, deadline and errors together; the
    # guard builds its own handler.
    assert once == 2
    assert built == [method] * once


class _Recording(WrappingInterceptor):
    def __init__(self, name: str, log: list[str], exempt_method: str = "") -> None:
        self.name, self.log, self.exempt_method = name, log, exempt_method

    def exempt(self, method: str) -> bool:
        return method == self.exempt_method

    @contextlib.asynccontextmanager
    async def around(self, method: str, context: Any) -> AsyncIterator[None]:
        self.log.append(f"enter {self.name}")
        try:
            yield
        except ValueError:
            self.log.append(f"saw ValueError {self.name}")
            raise KeyError(self.name) from None
        except KeyError as error:
            self.log.append(f"saw KeyError({error.args[0]}) {self.name}")
            raise
        finally:
            self.log.append(f"exit {self.name}")


async def test_the_chain_nests_its_members_in_one_streaming_layer() -> None:
    """Members enter outermost first and unwind innermost first; an exception a member
    replaces is what the members outside it see (as if they were nested); a member's own
    exemption skips only that member."""
    log: list[str] = []
    chain = InterceptorChain(
        [_Recording("outer", log), _Recording("mid", log, "/pkg.Svc/Skip"), _Recording("in", log)]
    )

    async def items(request: Any, context: Any) -> AsyncIterator[int]:
        log.append("handler")
        for i in range(3):
            yield i
        if request == "fail":
            raise ValueError("boom")

    inner = grpc.unary_stream_rpc_method_handler(items)

    async def cont(_: Any) -> Any:
        return inner

    handler = await chain.intercept_service(cont, _Details("/pkg.Svc/A"))
    assert handler is not None and handler is not inner
    assert [i async for i in handler.unary_stream("ok", None)] == [0, 1, 2]
    assert log == [
        "enter outer",
        "enter mid",
        "enter in",
        "handler",
        "exit in",
        "exit mid",
        "exit outer",
    ]

    log.clear()
    try:
        [i async for i in handler.unary_stream("fail", None)]
    except KeyError as error:
        assert error.args == ("in",)
    else:
        raise AssertionError("the replaced exception did not reach the caller")
    assert log == [
        "enter outer",
        "enter mid",
        "enter in",
        "handler",
        "saw ValueError in",
        "exit in",
        "saw KeyError(in) mid",
        "exit mid",
        "saw KeyError(in) outer",
        "exit outer",
    ]

    log.clear()
    skip = await chain.intercept_service(cont, _Details("/pkg.Svc/Skip"))
    assert skip is not None
    assert [i async for i in skip.unary_stream("ok", None)] == [0, 1, 2]
    assert log == ["enter outer", "enter in", "handler", "exit in", "exit outer"]
