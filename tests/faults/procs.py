"""Service processes for the fault tests: started on free 127.0.0.1 ports, awaited through
their health service, their stdout read line by line."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    process: asyncio.subprocess.Process
    address: str

    async def line(self, needle: str, timeout_s: float = 60) -> str:
        """The next stdout line containing ``needle``."""
        assert self.process.stdout is not None

        async def read() -> str:
            assert self.process.stdout is not None
            while raw := await self.process.stdout.readline():
                text = raw.decode(errors="replace")
                if needle in text:
                    return text
            raise AssertionError(f"{needle!r} never printed")

        return await asyncio.wait_for(read(), timeout_s)

    async def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()

    async def wait(self, timeout_s: float = 60) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def spawn(argv: list[str], env: dict[str, str], port: int) -> Proc:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=REPO,
        env={**base, "AGENTMESH_LOG_FORMAT": "text", **env},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return Proc(process, f"127.0.0.1:{port}")


def tools_env(port: int, data_dir: Path) -> dict[str, str]:
    return {
        "AGENTMESH_TOOLS_PORT": str(port),
        "AGENTMESH_TOOLS_METRICS_PORT": "0",
        "AGENTMESH_TOOLS_DATA_DIR": str(data_dir),
        "AGENTMESH_TOOLS_GRACE_SECONDS": "10",
    }


async def until_health(address: str, serving: bool, timeout_s: float = 120) -> None:
    """Returns once the server's overall health is SERVING (or, with ``serving`` False, no
    longer SERVING: NOT_SERVING, or the server gone)."""
    want = health_pb2.HealthCheckResponse.SERVING

    async def watch() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), wait_for_ready=serving
            )
            try:
                async for reply in stream:
                    if (reply.status == want) is serving:
                        return
            except grpc.aio.AioRpcError:
                if not serving:
                    return
                raise
            if not serving:
                return
            raise AssertionError("health stream ended")

    await asyncio.wait_for(watch(), timeout_s)
