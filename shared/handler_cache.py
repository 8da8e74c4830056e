"""Handlers an interceptor builds around the one below it, built once per method.

grpc asks every interceptor for the method's handler on every call. The generated handler
at the bottom of the chain is the same object call after call, so an interceptor that
remembers what it built around it (keyed by method, checked by identity) hands back the
same handler; that only holds up the chain if every interceptor below does the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class HandlerCache:
    """method -> (the inner handler, the handler built around it)."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[Handler, Handler]] = {}

    def get(self, method: str, inner: Handler, build: Callable[[Handler], Handler]) -> Handler:
        """The handler built around ``inner`` for ``method``; built afresh when ``inner``
        is not the one last seen for it."""
        hit = self._built.get(method)
        if hit is not None and hit[0] is inner:
            return hit[1]
        built = build(inner)
        self._built[method] = (inner, built)
        return built
