"""``python -m tests.faults.processes <tools|inference|scripted-inference> [--hold]``: a
service process for the fault tests, configured from the environment like the real entry
points, that starts in seconds: the real tools service (hashed embeddings for the knowledge
base), the real inference service over a fake engine, or the scripted model of
tests/orchestrator/grpc_fakes.py behind the shared server bootstrap (``scripted-inference``,
port from ``AGENTMESH_INFERENCE_PORT``).

With ``--hold`` every ExecuteTools call (tools), generation after its first delta
(inference) or answer after its first word (scripted-inference) waits for a line on stdin,
after printing ``HELD`` on stdout: a test knows a call is in flight in the process, then
kills or stops it.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from agentmesh.inference.v1 import inference_pb2_grpc
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.inference.config import InferenceSettings
from services.inference.service import InferenceService
from services.tools.config import ToolsSettings
from services.tools.service import ToolServicer, ToolsService
from shared.config import load_settings
from shared.server import run_service
from tests.inference.fakes import FakeEngineFactory
from tests.orchestrator.grpc_fakes import FakeInferenceServicer, FakeService
from tests.tools.fakes import HashEmbedder


class StdinGate:
    """Opens once a line arrives on stdin (read off the event loop's thread)."""

    def __init__(self) -> None:
        self._opened: asyncio.Event | None = None

    async def wait(self) -> None:
        if self._opened is None:
            self._opened = asyncio.Event()
            asyncio.get_running_loop().run_in_executor(None, self._read, asyncio.get_running_loop())
        print("HELD", flush=True)
        await self._opened.wait()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        sys.stdin.readline()
        assert self._opened is not None
        loop.call_soon_threadsafe(self._opened.set)

    def set(self) -> None:  # FakeEngine.hold_after_first needs only wait(); set for symmetry
        if self._opened is not None:
            self._opened.set()

    def is_set(self) -> bool:
        return self._opened is not None and self._opened.is_set()


class HeldToolServicer(ToolServicer):
    def __init__(self, service: ToolsService, gate: StdinGate) -> None:
        super().__init__(service)
        self._gate = gate

    async def ExecuteTools(
        self, request: tools_pb2.ExecuteToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools_pb2.ExecuteToolsResponse:
        await self._gate.wait()
        return await super().ExecuteTools(request, context)


class HeldToolsService(ToolsService):
    def __init__(self, settings: ToolsSettings, gate: StdinGate) -> None:
        super().__init__(settings, embedder=HashEmbedder())
        self._gate = gate

    def register(self, server: grpc.aio.Server) -> None:
        tools_pb2_grpc.add_ToolServiceServicer_to_server(HeldToolServicer(self, self._gate), server)


def main(argv: list[str]) -> int:
    role, hold = argv[0], "--hold" in argv
    if role == "tools":
        settings = load_settings(ToolsSettings, "tools")
        service: Any = (
            HeldToolsService(settings, StdinGate())
            if hold
            else ToolsService(settings, embedder=HashEmbedder())
        )
        return run_service(service, settings)
    if role == "inference":
        inference = load_settings(InferenceSettings, "inference")
        factory = FakeEngineFactory(hold_after_first=StdinGate() if hold else None)
        factory.kwargs["script"] = lambda ids, params: "one two three four five six seven"
        return run_service(InferenceService(inference, engine_factory=factory), inference)
    if role == "scripted-inference":
        inference = load_settings(InferenceSettings, "inference")
        servicer = FakeInferenceServicer()
        servicer.compose_gate = StdinGate() if hold else None  # type: ignore[assignment]
        fake = FakeService(
            "inference",
            ["agentmesh.inference.v1.InferenceService"],
            servicer,
            inference_pb2_grpc.add_InferenceServiceServicer_to_server,
        )
        return run_service(fake, inference)
    raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
