"""An orchestrator on 127.0.0.1:0 over fake inference and tools servers (real gRPC, real
session store), for the fault tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.loop.policy import Caps
from services.orchestrator.service import OrchestratorService
from shared.server import GrpcServer
from tests.orchestrator.grpc_fakes import FakeInferenceServicer, FakeToolServicer, start_fake


@dataclass
class FakeMesh:
    inference: FakeInferenceServicer
    tools: FakeToolServicer
    inference_server: GrpcServer
    tools_server: GrpcServer
    store_url: str
    servers: list[GrpcServer] = field(default_factory=list)

    def settings(self, **overrides: Any) -> OrchestratorSettings:
        values: dict[str, Any] = {
            "port": 0,
            "metrics_port": 0,
            "grace_seconds": 1.0,
            "inference": {"target": self.inference_server.address},
            "tools": {"target": self.tools_server.address},
            "session_store_url": self.store_url,
            "caps": Caps(turn_budget_s=20, task_budget_s=200),
            "dependency_wait_s": 10,
        }
        values.update(overrides)
        return OrchestratorSettings(**values)

    async def orchestrator(self, **overrides: Any) -> tuple[GrpcServer, OrchestratorService]:
        settings = self.settings(**overrides)
        service = OrchestratorService(settings)
        server = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
        await server.start()
        await server.wait_until_serving(20)
        self.servers.append(server)
        return server, service

    async def close(self) -> None:
        for server in [*self.servers, self.inference_server, self.tools_server]:
            await server.stop(grace=0.5)


async def start_mesh(store_url: str) -> FakeMesh:
    inference_server, inference = await start_fake("inference")
    tools_server, tools = await start_fake("tools")
    return FakeMesh(inference, tools, inference_server, tools_server, store_url)


def agent_stub(channel: grpc.aio.Channel) -> orchestrator_pb2_grpc.AgentServiceStub:
    return orchestrator_pb2_grpc.AgentServiceStub(channel)


async def create(stub: Any, customer_id: str = "CUST-0042") -> str:
    reply = await stub.CreateSession(pb.CreateSessionRequest(customer_id=customer_id), timeout=10)
    return str(reply.session.session_id)


async def run(stub: Any, session_id: str, text: str, **kw: Any) -> list[pb.RunTurnResponse]:
    request = pb.RunTurnRequest(session_id=session_id, user_message=text, **kw)
    return [r async for r in stub.RunTurn(request, timeout=30)]


def kinds(events: list[pb.RunTurnResponse]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


def completed(events: list[pb.RunTurnResponse]) -> pb.TurnCompleted:
    done = [e.turn_completed for e in events if e.HasField("turn_completed")]
    assert len(done) == 1, kinds(events)
    return done[0]


def error_reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("no ErrorInfo")


def retry_delay_ms(err: grpc.aio.AioRpcError) -> int:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return int(info.retry_delay.ToMilliseconds())
    raise AssertionError("no RetryInfo")
