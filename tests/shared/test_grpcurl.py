"""grpcurl, as an operator runs it, against a real server: reflection needs no proto files."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.config import ServiceSettings
from shared.server import GrpcServer
from tests.shared.echo_service import SERVICE, EchoService

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl comes with the dev extras")


async def _grpcurl(*args: str) -> tuple[int, str]:
    assert GRPCURL is not None
    process = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    return int(process.returncode or 0), out.decode()


@pytest.fixture
async def warm_server() -> AsyncIterator[GrpcServer]:
    server = GrpcServer(EchoService(), ServiceSettings(port=0, metrics_port=0))
    await server.start()
    await server.wait_until_serving(10)
    yield server
    await server.stop(grace=1)


async def test_grpcurl_list_and_health(warm_server: GrpcServer) -> None:
    target = f"localhost:{warm_server.port}"
    code, out = await _grpcurl("-plaintext", target, "list")
    assert code == 0, out
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        out.split()
    )
    code, out = await _grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
    assert code == 0, out
    assert json.loads(out) == {"status": "SERVING"}
    code, out = await _grpcurl(
        "-plaintext", "-d", json.dumps({"service": SERVICE}), target, "grpc.health.v1.Health/Check"
    )
    assert code == 0 and json.loads(out) == {"status": "SERVING"}, out
