"""Transport security through real servers: mTLS works with the mesh CA and a verified server
name; a plaintext client, a client without a certificate, one with a certificate from another
CA, and one expecting another server name all fail; plaintext needs loopback or an explicit
setting, and the start-up summary says which."""

from __future__ import annotations

import logging

import grpc
import pytest
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.channels import channel_from_settings, create_channel
from shared.config import ClientSettings, ServiceSettings
from shared.server import GrpcServer
from shared.tls import PlaintextRefused, is_loopback, split_host
from tests.security.conftest import SecureMesh
from tests.security.pki import SERVICE_NAMES, Pki
from tests.shared.echo_service import SERVICE, EchoService


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return int(reply.status)


async def test_mtls_client_with_the_mesh_ca_and_a_token_gets_through(
    secure_mesh: SecureMesh,
) -> None:
    async with secure_mesh.channel(secure_mesh.orchestrator) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
        reply = await stub.CreateSession(
            pb.CreateSessionRequest(), metadata=secure_mesh.header("alice"), timeout=10
        )
        assert reply.session.session_id


async def test_plaintext_client_against_an_mtls_server_fails(secure_mesh: SecureMesh) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secure_mesh.orchestrator.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _health(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_certificate_from_another_ca_fails(secure_mesh: SecureMesh) -> None:
    async with secure_mesh.channel(secure_mesh.orchestrator, rogue=True) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _health(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_without_a_certificate_fails(secure_mesh: SecureMesh) -> None:
    credentials = grpc.ssl_channel_credentials(secure_mesh.pki.ca_file.read_bytes())
    options = [("grpc.ssl_target_name_override", SERVICE_NAMES["orchestrator"])]
    address = f"127.0.0.1:{secure_mesh.orchestrator.port}"
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _health(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_verifies_the_server_name(secure_mesh: SecureMesh) -> None:
    pki = secure_mesh.pki
    # The inference server's certificate does not name the orchestrator.
    async with secure_mesh.channel(secure_mesh.inference, service="orchestrator") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _health(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    tls = pki.client_tls("client", "inference")
    good = ClientSettings(target=f"127.0.0.1:{secure_mesh.inference.port}", tls=tls)
    async with channel_from_settings(good) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    wrong = tls.model_copy(update={"server_name": "evil.example"})
    async with create_channel(good.target, tls=wrong) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _health(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_server_with_another_cas_certificate_is_refused(pki: Pki) -> None:
    cert, key = pki.rogue_certs["orchestrator"]
    from shared.config import TlsSettings

    settings = ServiceSettings(
        port=0, metrics_port=0, tls=TlsSettings(cert_file=cert, key_file=key, ca_file=pki.ca_file)
    )
    server = GrpcServer(EchoService(), settings)
    await server.start()
    try:
        await server.wait_until_serving(10)
        client = ClientSettings(
            target=f"127.0.0.1:{server.port}", tls=pki.client_tls("client", "orchestrator")
        )
        async with channel_from_settings(client) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _health(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=1)


async def test_plaintext_only_on_loopback_or_explicitly(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(PlaintextRefused):
        await GrpcServer(EchoService(), ServiceSettings(host="0.0.0.0", port=0)).start()
    with pytest.raises(PlaintextRefused):
        channel_from_settings(ClientSettings(target="inference.agentmesh.svc:50052"))
    explicit = channel_from_settings(
        ClientSettings(target="inference.agentmesh.svc:50052", allow_plaintext=True)
    )
    await explicit.close()
    caplog.set_level(logging.INFO, logger="agentmesh.server")
    server = GrpcServer(EchoService(), ServiceSettings(port=0, metrics_port=0))
    await server.start()
    try:
        lines = [r.getMessage() for r in caplog.records if r.name == "agentmesh.server"]
        assert "echo transport: PLAINTEXT on 127.0.0.1 (no tls configured)" in lines
        assert any(line.startswith("echo auth: OFF") for line in lines)
        async with grpc.aio.insecure_channel(server.address) as channel:
            echo = channel.unary_unary(f"/{SERVICE}/Echo")
            assert await echo(b"x", timeout=5) == b"x"
    finally:
        await server.stop(grace=1)


@pytest.mark.parametrize(
    ("target", "host", "loopback"),
    [
        ("127.0.0.1:50051", "127.0.0.1", True),
        ("localhost:1", "localhost", True),
        ("[::1]:50051", "::1", True),
        ("dns:///inference:50052", "inference", False),
        ("10.0.0.7:50053", "10.0.0.7", False),
    ],
)
def test_loopback_detection(target: str, host: str, loopback: bool) -> None:
    assert split_host(target) == host
    assert is_loopback(host) is loopback
