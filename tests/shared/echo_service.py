"""A tiny service for testing the bootstrap without domain code.

Raw-bytes handlers (no proto needed): ``Echo`` returns its request, ``Count`` streams
``n`` numbered messages with a pause, ``Fail`` raises an exception carrying a secret,
``Raise`` raises a domain error, ``Flaky`` fails twice then answers, ``Remaining``
reports the deadline the handler sees, ``Forward`` calls another server's ``Remaining``
through a shared channel and returns what that downstream saw.
Run as a script it serves until SIGTERM (used by the shutdown test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

SERVICE = "agentmesh.testing.v1.EchoService"


def _identity(data: bytes) -> bytes:
    return data


class EchoService:
    name = "echo"
    service_names: Sequence[str] = (SERVICE,)

    def __init__(self, warm_up_event: asyncio.Event | None = None, downstream: str = "") -> None:
        self._warm_up_event = warm_up_event
        self._downstream = downstream
        self.closed = False
        self.metrics_registry = CollectorRegistry()
        self.flaky_attempts: dict[bytes, int] = {}

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo, _identity, _identity),
            "Count": grpc.unary_stream_rpc_method_handler(self.count, _identity, _identity),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail, _identity, _identity),
            "Remaining": grpc.unary_unary_rpc_method_handler(self.remaining, _identity, _identity),
            "Forward": grpc.unary_unary_rpc_method_handler(self.forward, _identity, _identity),
            "Raise": grpc.unary_unary_rpc_method_handler(self.raise_error, _identity, _identity),
            "Flaky": grpc.unary_unary_rpc_method_handler(self.flaky, _identity, _identity),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])

    async def warm_up(self, health: object) -> None:
        if self._warm_up_event is not None:
            await self._warm_up_event.wait()

    async def close(self) -> None:
        self.closed = True

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    async def count(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        spec = json.loads(request or b"{}")
        for index in range(int(spec.get("n", 5))):
            await asyncio.sleep(float(spec.get("pause_s", 0.1)))
            yield str(index).encode()

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise ValueError("secret=hunter2 in the database password")

    async def raise_error(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        from shared import errors

        kind = request.decode()
        table: dict[str, Exception] = {
            "invalid": errors.InvalidArgument("messages", "at least one message is required"),
            "not_found": errors.NotFound("lane 'nope' is not hosted here"),
            "exhausted": errors.ResourceExhausted("lane workhorse is full", retry_after_s=0.25),
            "precondition": errors.FailedPrecondition("a turn is already in flight"),
            "unavailable": errors.Unavailable("engine is down"),
            "deadline": errors.DeadlineExceeded("turn budget spent"),
        }
        raise table[kind]

    async def flaky(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """UNAVAILABLE for the first two attempts with a given request, then OK."""
        from shared import errors

        attempt = self.flaky_attempts.get(request, 0) + 1
        self.flaky_attempts[request] = attempt
        if attempt <= 2:
            raise errors.Unavailable("warming a cache")
        return str(attempt).encode()

    async def remaining(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return json.dumps({"remaining": context.time_remaining()}).encode()

    async def forward(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        from shared.channels import create_channel

        async with create_channel(self._downstream) as channel:
            call = channel.unary_unary(f"/{SERVICE}/Remaining", _identity, _identity)
            return bytes(await call(b""))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--grace", type=float, default=10.0)
    args = parser.parse_args()

    import uvloop

    from shared.config import ServiceSettings
    from shared.server import GrpcServer, serve

    def write_port(server: GrpcServer) -> None:
        args.port_file.write_text(str(server.port))

    settings = ServiceSettings(port=0, grace_seconds=args.grace)
    return uvloop.run(serve(EchoService(), settings, on_serving=write_port))


if __name__ == "__main__":
    sys.exit(main())
