"""The bootstrap through real servers on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from shared.config import ServiceSettings
from shared.server import GrpcServer
from tests.shared.echo_service import SERVICE, EchoService

REPO = Path(__file__).resolve().parents[2]


def _identity(data: bytes) -> bytes:
    return data


@pytest.fixture
async def warm_gate() -> asyncio.Event:
    return asyncio.Event()


@pytest.fixture
async def echo_server(warm_gate: asyncio.Event) -> AsyncIterator[GrpcServer]:
    server = GrpcServer(EchoService(warm_gate), ServiceSettings(port=0, metrics_port=0))
    await server.start()
    yield server
    await server.stop(grace=1)


async def _health(address: str, name: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        return int(reply.status)


async def test_health_is_not_serving_until_warm(
    echo_server: GrpcServer, warm_gate: asyncio.Event
) -> None:
    assert await _health(echo_server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _health(echo_server.address, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    warm_gate.set()
    await echo_server.wait_until_serving(10)
    assert await _health(echo_server.address) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(echo_server.address, SERVICE) == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_service_health_and_reflection(echo_server: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(echo_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names: set[str] = set()
        async for reply in stub.ServerReflectionInfo(requests(), timeout=5):
            names |= {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_unhandled_exception_is_internal_without_its_text(echo_server: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(echo_server.address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Fail", _identity, _identity)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"", timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    everything = f"{error.details()} {error.trailing_metadata()} {error.debug_error_string()}"
    assert "hunter2" not in everything
    assert "secret" not in everything
    assert "ValueError" not in everything


@pytest.mark.parametrize(
    ("kind", "code", "reason"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("not_found", grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        ("exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        ("precondition", grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
        ("unavailable", grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
        ("deadline", grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    ],
)
async def test_domain_errors_map_to_status_with_error_info(
    echo_server: GrpcServer, kind: str, code: grpc.StatusCode, reason: str
) -> None:
    async with grpc.aio.insecure_channel(echo_server.address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Raise", _identity, _identity)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(kind.encode(), timeout=5)
    error = caught.value
    assert error.code() == code
    status = rpc_status.from_call(error)
    assert status is not None
    unpacked: dict[str, object] = {}
    for detail in status.details:
        for message_type in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(message_type.DESCRIPTOR):
                message = message_type()
                detail.Unpack(message)
                unpacked[message_type.__name__] = message
    info = unpacked["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == reason and info.domain == "agentmesh"
    if kind == "invalid":
        bad = unpacked["BadRequest"]
        assert isinstance(bad, error_details_pb2.BadRequest)
        assert bad.field_violations[0].field == "messages"
        assert "messages" in error.details()
    if kind == "exhausted":
        retry = unpacked["RetryInfo"]
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToMilliseconds() == 250


async def test_downstream_call_carries_less_than_the_callers_deadline() -> None:
    downstream = GrpcServer(EchoService(), ServiceSettings(port=0, metrics_port=0))
    await downstream.start()
    upstream = GrpcServer(
        EchoService(downstream=downstream.address), ServiceSettings(port=0, metrics_port=0)
    )
    await upstream.start()
    try:
        async with grpc.aio.insecure_channel(upstream.address) as channel:
            call = channel.unary_unary(f"/{SERVICE}/Forward", _identity, _identity)
            seen = json.loads(await call(b"", timeout=0.5))
        assert seen["remaining"] is not None
        assert 0 < seen["remaining"] < 0.5
    finally:
        await upstream.stop(grace=1)
        await downstream.stop(grace=1)


async def test_channels_retry_only_the_methods_named_idempotent(echo_server: GrpcServer) -> None:
    from shared.channels import create_channel

    retried = create_channel(echo_server.address, retry_methods=[(SERVICE, "Flaky")])
    plain = create_channel(echo_server.address)
    async with retried, plain:
        reply = await retried.unary_unary(f"/{SERVICE}/Flaky", _identity, _identity)(
            b"k1", timeout=10
        )
        assert reply == b"3"  # two UNAVAILABLE attempts retried by the channel
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await plain.unary_unary(f"/{SERVICE}/Flaky", _identity, _identity)(b"k2", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_metrics_endpoint_counts_rpcs() -> None:
    server = GrpcServer(EchoService(), ServiceSettings(port=0, metrics_port=0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await channel.unary_unary(f"/{SERVICE}/Echo", _identity, _identity)(b"hi", timeout=5)
        text = server.metrics_registry.get_sample_value(
            "agentmesh_rpc_requests_total",
            {"service": SERVICE, "method": "Echo", "code": "OK"},
        )
        assert text == 1.0
    finally:
        await server.stop(grace=1)


async def test_metrics_http_endpoint_serves_prometheus_text(unused_tcp_port: int) -> None:
    server = GrpcServer(EchoService(), ServiceSettings(port=0, metrics_port=unused_tcp_port))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await channel.unary_unary(f"/{SERVICE}/Echo", _identity, _identity)(b"hi", timeout=5)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
        assert 'agentmesh_rpc_requests_total{code="OK",method="Echo"' in body
    finally:
        await server.stop(grace=1)


async def test_auth_token_required_except_for_health() -> None:
    server = GrpcServer(EchoService(), ServiceSettings(port=0, metrics_port=0, auth_token="s3cret"))
    await server.start()
    try:
        await server.wait_until_serving(10)
        assert await _health(server.address) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.unary_unary(f"/{SERVICE}/Echo", _identity, _identity)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"x", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = await call(b"x", timeout=5, metadata=(("authorization", "Bearer s3cret"),))
            assert reply == b"x"
    finally:
        await server.stop(grace=1)


async def test_sigterm_drains_streams_then_refuses_then_exits_zero(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")])}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.shared.echo_service",
        "--port-file",
        str(port_file),
        cwd=REPO,
        env=env,
    )
    try:
        for _ in range(300):
            if port_file.exists() and port_file.read_text():
                break
            await asyncio.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text()}"
        async with grpc.aio.insecure_channel(address) as channel:
            count = channel.unary_stream(f"/{SERVICE}/Count", _identity, _identity)
            echo = channel.unary_unary(f"/{SERVICE}/Echo", _identity, _identity)
            stream = count(json.dumps({"n": 8, "pause_s": 0.25}).encode(), timeout=30)
            received = [await stream.read()]
            process.send_signal(signal.SIGTERM)
            refused = None
            for _ in range(100):
                try:
                    await echo(b"late", timeout=2)
                except grpc.aio.AioRpcError as error:
                    refused = error.code()
                    break
                await asyncio.sleep(0.02)
            assert refused == grpc.StatusCode.UNAVAILABLE
            while (message := await stream.read()) is not grpc.aio.EOF:
                received.append(message)
            assert await stream.code() == grpc.StatusCode.OK
        assert received == [str(i).encode() for i in range(8)]
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
