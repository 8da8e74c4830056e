"""Caller identity and scopes through real servers with mTLS on: UNAUTHENTICATED without a
valid token, PERMISSION_DENIED without the scope, NOT_FOUND for another principal's session,
admin-only lane forcing and budget raises, the orchestrator's own scoped calls downstream."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from services.orchestrator.access import OWNER_KEY
from shared.auth import Authenticator, hash_token
from shared.config import AuthSettings, ServiceSettings, StaticKey
from shared.server import GrpcServer
from tests.security.conftest import SecureMesh
from tests.shared.echo_service import SERVICE, EchoService


def _code(error: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> grpc.StatusCode:
    return error.value.code()


def _field(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return str(bad.field_violations[0].field)
    raise AssertionError("no BadRequest detail")


async def _create(stub: Any, who: str, mesh: SecureMesh, **kw: Any) -> pb.Session:
    reply = await stub.CreateSession(
        pb.CreateSessionRequest(customer_id="CUST-0001", **kw),
        metadata=mesh.header(who),
        timeout=10,
    )
    return reply.session  # type: ignore[no-any-return]


async def _turn(stub: Any, mesh: SecureMesh, who: str, session_id: str, **kw: Any) -> list[Any]:
    request = pb.RunTurnRequest(session_id=session_id, user_message="Was I charged twice?", **kw)
    call = stub.RunTurn(request, metadata=mesh.header(who), timeout=20)
    return [event async for event in call]


async def test_no_token_and_bad_token_are_unauthenticated(secure_mesh: SecureMesh) -> None:
    async with secure_mesh.channel(secure_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateSession(pb.CreateSessionRequest(), timeout=10)
        assert _code(caught) == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == "missing bearer token"
        for header in ("Bearer not-a-key", "Basic abc", "Bearer a.b.c"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateSession(
                    pb.CreateSessionRequest(), metadata=(("authorization", header),), timeout=10
                )
            assert _code(caught) == grpc.StatusCode.UNAUTHENTICATED


async def test_valid_token_without_the_scope_is_permission_denied(
    secure_mesh: SecureMesh,
) -> None:
    async with secure_mesh.channel(secure_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _create(stub, "tools-only", secure_mesh)
        assert _code(caught) == grpc.StatusCode.PERMISSION_DENIED
        assert "agent:run" in (caught.value.details() or "")
    # An agent:run token is not an inference:call token.
    async with secure_mesh.channel(secure_mesh.inference, service="inference") as channel:
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await inference.ListLanes(
                inference_pb2.ListLanesRequest(), metadata=secure_mesh.header("alice"), timeout=10
            )
        assert _code(caught) == grpc.StatusCode.PERMISSION_DENIED
        reply = await inference.ListLanes(
            inference_pb2.ListLanesRequest(),
            metadata=secure_mesh.header("orchestrator"),
            timeout=10,
        )
        assert reply is not None
    async with secure_mesh.channel(secure_mesh.tools, service="tools") as channel:
        tools = tools_pb2_grpc.ToolServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tools.ListTools(
                tools_pb2.ListToolsRequest(), metadata=secure_mesh.header("admin"), timeout=10
            )
        assert _code(caught) == grpc.StatusCode.PERMISSION_DENIED
        listed = await tools.ListTools(
            tools_pb2.ListToolsRequest(), metadata=secure_mesh.header("tools-only"), timeout=10
        )
        assert [t.name for t in listed.tools]


async def test_sessions_are_visible_only_to_their_creator(secure_mesh: SecureMesh) -> None:
    async with secure_mesh.channel(secure_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        session = await _create(stub, "alice", secure_mesh)
        assert session.metadata[OWNER_KEY] == "key:alice"
        sid = session.session_id

        for call in (
            stub.GetSession(
                pb.GetSessionRequest(session_id=sid), metadata=secure_mesh.header("bob"), timeout=10
            ),
            stub.EndSession(
                pb.EndSessionRequest(session_id=sid), metadata=secure_mesh.header("bob"), timeout=10
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert _code(caught) == grpc.StatusCode.NOT_FOUND
            assert caught.value.details() == "no such session"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _turn(stub, secure_mesh, "bob", sid)
        assert _code(caught) == grpc.StatusCode.NOT_FOUND
        # The same answer as for a session that does not exist at all.
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetSession(
                pb.GetSessionRequest(session_id="no-such-session"),
                metadata=secure_mesh.header("bob"),
                timeout=10,
            )
        assert missing.value.details() == caught.value.details()

        events = await _turn(stub, secure_mesh, "alice", sid)
        completed = events[-1].turn_completed
        assert completed.outcome == pb.TURN_OUTCOME_COMPLETED
        own = await stub.GetSession(
            pb.GetSessionRequest(session_id=sid), metadata=secure_mesh.header("alice"), timeout=10
        )
        assert own.session.turn_count == 1
        # An admin may end another principal's session; bob still cannot see it.
        ended = await stub.EndSession(
            pb.EndSessionRequest(session_id=sid), metadata=secure_mesh.header("admin"), timeout=10
        )
        assert ended.session.state == pb.SESSION_STATE_ENDED


async def test_jwt_principals_and_expiry(secure_mesh: SecureMesh) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    issuer = secure_mesh.jwt
    good = issuer.token("carol", "agent:run")
    async with secure_mesh.channel(secure_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        reply = await stub.CreateSession(
            pb.CreateSessionRequest(), metadata=(("authorization", f"Bearer {good}"),), timeout=10
        )
        assert reply.session.metadata[OWNER_KEY] == "jwt:carol"
        refused = {
            "expired": issuer.token("carol", "agent:run", expires_in=-3600),
            "other key": issuer.token(
                "carol", "agent:run", key=ec.generate_private_key(ec.SECP256R1())
            ),
            "other audience": issuer.token("carol", "agent:run", audience="someone-else"),
        }
        for token in refused.values():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateSession(
                    pb.CreateSessionRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
            assert _code(caught) == grpc.StatusCode.UNAUTHENTICATED
        no_scope = issuer.token("carol", "tools:call")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateSession(
                pb.CreateSessionRequest(),
                metadata=(("authorization", f"Bearer {no_scope}"),),
                timeout=10,
            )
        assert _code(caught) == grpc.StatusCode.PERMISSION_DENIED


async def test_forcing_a_lane_and_raising_caps_need_admin(secure_mesh: SecureMesh) -> None:
    async with secure_mesh.channel(secure_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        mine = await _create(stub, "alice", secure_mesh)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _turn(stub, secure_mesh, "alice", mine.session_id, lane="speed")
        assert _code(caught) == grpc.StatusCode.PERMISSION_DENIED
        raised = pb.Budget(
            max_tool_calls_per_task=40, turn_budget=duration_pb2.Duration(seconds=30)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _create(stub, "alice", secure_mesh, budget=raised)
        assert _code(caught) == grpc.StatusCode.PERMISSION_DENIED
        lowered = await _create(
            stub, "alice", secure_mesh, budget=pb.Budget(max_tool_calls_per_task=7)
        )
        assert lowered.budget.max_tool_calls_per_task == 7

        admin = await _create(stub, "admin", secure_mesh, budget=raised)
        assert admin.budget.max_tool_calls_per_task == 40
        events = await _turn(stub, secure_mesh, "admin", admin.session_id, lane="speed")
        assert events[-1].turn_completed.outcome == pb.TURN_OUTCOME_COMPLETED
        over = pb.Budget(max_tool_calls_per_task=100_000)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _create(stub, "admin", secure_mesh, budget=over)
        assert _code(caught) == grpc.StatusCode.INVALID_ARGUMENT
        assert _field(caught.value) == "budget.max_tool_calls_per_task"
        assert "ceiling of 50" in (caught.value.details() or "")


async def test_reserved_metadata_keys_are_refused(secure_mesh: SecureMesh) -> None:
    async with secure_mesh.channel(secure_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _create(stub, "alice", secure_mesh, metadata={OWNER_KEY: "key:bob"})
        assert _code(caught) == grpc.StatusCode.INVALID_ARGUMENT
        assert _field(caught.value) == f"metadata[{OWNER_KEY}]"


async def test_health_is_exempt_and_reflection_needs_a_token(secure_mesh: SecureMesh) -> None:
    async with secure_mesh.channel(secure_mesh.orchestrator) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in reflection.ServerReflectionInfo(iter([request]), timeout=10):
                pass
        assert _code(caught) == grpc.StatusCode.UNAUTHENTICATED
        names = []
        call = reflection.ServerReflectionInfo(
            iter([request]), metadata=secure_mesh.header("bob"), timeout=10
        )
        async for response in call:
            names += [s.name for s in response.list_services_response.service]
        assert "agentmesh.orchestrator.v1.AgentService" in names


async def test_exemptions_are_configurable_and_the_legacy_token_still_works() -> None:
    token = "legacy-s3cret"
    settings = ServiceSettings(
        port=0,
        metrics_port=0,
        auth_token=token,
        auth=AuthSettings(health_exempt=False, reflection_exempt=True),
    )
    server = GrpcServer(EchoService(), settings)
    await server.start()
    try:
        await server.wait_until_serving(10)
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert _code(caught) == grpc.StatusCode.UNAUTHENTICATED
            header = (("authorization", f"Bearer {token}"),)
            reply = await health.Check(health_pb2.HealthCheckRequest(), metadata=header, timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            listed = [r async for r in reflection.ServerReflectionInfo(iter([request]), timeout=5)]
            assert listed
            echo = channel.unary_unary(f"/{SERVICE}/Echo")
            assert await echo(b"x", metadata=header, timeout=5) == b"x"
    finally:
        await server.stop(grace=1)


def test_static_keys_are_matched_by_hash_only() -> None:
    auth = Authenticator(
        AuthSettings(
            static_keys=[StaticKey(name="ci", sha256=hash_token("t0ken"), scopes=["agent:run"])]
        )
    )
    principal = auth.authenticate("Bearer t0ken")
    assert principal.name == "key:ci" and principal.scopes == frozenset({"agent:run"})
    assert auth.required_scope("/agentmesh.tools.v1.ToolService/ListTools") == "tools:call"
    assert auth.exempt("/grpc.health.v1.Health/Check")
    assert not auth.exempt("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
