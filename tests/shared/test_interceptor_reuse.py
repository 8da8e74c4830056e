"""Interceptor wrappers are built once per method: the same inner handler gets the same
wrapper on every call; a different inner handler (or method) gets its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from shared.interceptors import WrappingInterceptor


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
