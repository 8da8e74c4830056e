"""Interceptor wrappers are built once per method: the same inner handler gets the same
wrapper on every call; a different inner handler (or method) gets its own."""

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
from shared.interceptors import DrainInterceptor, WrappingInterceptor, default_interceptors
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
    interceptor = _Counting()
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
    assert interceptor.entered == ["/pkg.Svc/A", "/pkg.Svc/A"]


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
    assert any(isinstance(i, RequestGuardInterceptor) for i in chain)
    assert any(isinstance(i, AuthInterceptor) for i in chain)
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
    # drain, tracing, metrics, auth, deadline, errors wrap; the guard builds its handler.
    assert once == 7
    assert built == [method] * once
