"""A slow tool: one call of a batch outlives its deadline. The real tools service on 127.0.0.1
(its knowledge base never answers) under an in-process orchestrator over the scripted model:
that call comes back DEADLINE_EXCEEDED, the others of the batch OK, and the turn completes."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb

from services.tools.backends import Backends
from services.tools.registry import Registry, default_registry
from services.tools.service import ToolsService
from shared.server import GrpcServer
from tests.faults.conftest import Ledger
from tests.faults.mesh import FakeMesh, agent_stub, create
from tests.orchestrator.grpc_fakes import start_fake
from tests.tools.conftest import tools_settings
from tests.tools.fakes import GatedBilling, GatedCrm, GatedKb

ME = "CUST-0001"


def _short_kb_deadline(ms: int) -> Registry:
    """The default registry with kb_search's timeout cut to ``ms`` (keeps the test short)."""
    tools = [
        dataclasses.replace(t, timeout_ms=ms) if t.name == "kb_search" else t
        for t in default_registry()
    ]
    return Registry(tuple(tools))


async def test_a_slow_tool_times_out_alone_and_the_turn_completes(
    tmp_path: Path, ledger: Ledger
) -> None:
    # crm and billing meet at a barrier of two: each returns only if the other ran meanwhile,
    # so the batch really runs concurrently; kb_search never answers.
    barrier = asyncio.Barrier(2)
    backends = Backends(
        crm=GatedCrm(barrier), kb=GatedKb(barrier, hang=True), billing=GatedBilling(barrier)
    )
    service = ToolsService(
        tools_settings(tmp_path), backends=backends, registry=_short_kb_deadline(300)
    )
    tools_server = GrpcServer(service, service.settings, metrics_registry=service.metrics_registry)
    await tools_server.start()
    await tools_server.wait_until_serving(30)
    inference_server, inference = await start_fake("inference")
    mesh = FakeMesh(
        inference,
        None,  # type: ignore[arg-type]
        inference_server,
        tools_server,
        f"sqlite+aiosqlite:///{tmp_path / 'sessions.sqlite'}",
    )
    try:
        server, _ = await mesh.orchestrator()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = agent_stub(channel)
            sid = await create(stub, customer_id=ME)
            request = pb.RunTurnRequest(session_id=sid, user_message="Why was I charged twice?")
            events = [e async for e in stub.RunTurn(request, timeout=60)]
            ledger.status(grpc.StatusCode.OK)
            ledger.turn(finished=any(e.HasField("turn_completed") for e in events))

            finished = sorted(
                (e.tool_call_finished.name, e.tool_call_finished.status, e.tool_call_finished.round)
                for e in events
                if e.HasField("tool_call_finished")
            )
            # One batch of the three reads, each once (a dict would hide a repeated call).
            assert finished == [
                ("billing_lookup", "OK", 1),
                ("crm_lookup", "OK", 1),
                ("kb_search", "DEADLINE_EXCEEDED", 1),
            ]
            [done] = [e.turn_completed for e in events if e.HasField("turn_completed")]
            assert done.outcome == pb.TURN_OUTCOME_COMPLETED
            assert done.answer == inference.answer

            # The session keeps the turn and its answer.
            stored = await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
            assert stored.session.turn_count == 1
            assert stored.session.messages[-1].content == inference.answer
    finally:
        await mesh.close()
