"""Client channels between services: keepalive, retries only where safe, deadlines passed on.

Retries are configured per method through the gRPC service config and only for RPCs the
caller names as idempotent: a retried write could move money twice. Every call made through
these channels inherits the serving RPC's remaining time minus a margin unless the caller
gives a shorter timeout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

from shared.config import ClientSettings, ClientTlsSettings
from shared.deadlines import downstream_timeout
from shared.interceptors import REQUEST_ID_HEADER
from shared.logging import current_request_id
from shared.telemetry import Telemetry
from shared.tls import channel_credentials, channel_tls_options, check_plaintext, split_host

KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted downstream is reachable again within ~2 s, not after minutes of back-off.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def retry_service_config(methods: Sequence[tuple[str, str | None]], max_attempts: int = 4) -> str:
    """Service config retrying UNAVAILABLE for ``(service, method)`` pairs (method None: all)."""
    names = [
        {"service": service, **({"method": method} if method else {})}
        for service, method in methods
    ]
    config: dict[str, Any] = {"methodConfig": []}
    if names:
        config["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(config)


class _CallDefaults:
    """Fills in timeout (from the serving RPC's deadline), request id and auth metadata."""

    def __init__(self, margin_s: float, auth_token: str | None) -> None:
        self._margin_s = margin_s
        self._auth_token = auth_token

    def details(self, call: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        timeout = call.timeout
        inherited = downstream_timeout(self._margin_s)
        if inherited is not None:
            timeout = inherited if timeout is None else min(timeout, inherited)
        metadata = grpc.aio.Metadata(*(tuple(call.metadata) if call.metadata else ()))
        keys = {key for key, _ in metadata}
        if REQUEST_ID_HEADER not in keys and current_request_id() != "-":
            metadata.add(REQUEST_ID_HEADER, current_request_id())
        if self._auth_token and "authorization" not in keys:
            metadata.add("authorization", f"Bearer {self._auth_token}")
        return grpc.aio.ClientCallDetails(
            call.method, timeout, metadata, call.credentials, call.wait_for_ready
        )


class _UnaryUnary(_CallDefaults, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, call: Any, request: Any) -> Any:
        return await continuation(self.details(call), request)


class _UnaryStream(_CallDefaults, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, call: Any, request: Any) -> Any:
        return await continuation(self.details(call), request)


class _StreamUnary(_CallDefaults, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, call: Any, request_iter: Any) -> Any:
        return await continuation(self.details(call), request_iter)


class _StreamStream(_CallDefaults, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, call: Any, request_iter: Any) -> Any:
        return await continuation(self.details(call), request_iter)


def create_channel(
    target: str,
    *,
    retry_methods: Sequence[tuple[str, str | None]] = (),
    auth_token: str | None = None,
    deadline_margin_s: float = 0.05,
    max_message_bytes: int = 16 * 1024 * 1024,
    tls: ClientTlsSettings | None = None,
    telemetry: Telemetry | None = None,
) -> grpc.aio.Channel:
    """An aio channel with the agentmesh call defaults: TLS (verifying the server's name,
    presenting a client certificate when configured) when ``tls`` is given, else plaintext."""
    options: list[tuple[str, Any]] = [
        *KEEPALIVE_OPTIONS,
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(retry_methods)),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    interceptors: list[Any] = [
        cls(deadline_margin_s, auth_token)
        for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)
    ]
    if telemetry is not None:
        # Client spans, and the trace context in the metadata (one turn, one trace).
        interceptors += telemetry.client_interceptors()
    if tls is not None:
        options += channel_tls_options(tls)
        return grpc.aio.secure_channel(
            target, channel_credentials(tls), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def channel_from_settings(
    client: ClientSettings,
    *,
    retry_methods: Sequence[tuple[str, str | None]] = (),
    max_message_bytes: int = 16 * 1024 * 1024,
    telemetry: Telemetry | None = None,
) -> grpc.aio.Channel:
    """The channel a ClientSettings describes: TLS and token from configuration; plaintext
    only to a loopback target or with ``allow_plaintext``."""
    if client.tls is None:
        check_plaintext(
            f"client of {client.target}", split_host(client.target), client.allow_plaintext
        )
    return create_channel(
        client.target,
        retry_methods=retry_methods,
        auth_token=client.auth_token.get_secret_value() if client.auth_token else None,
        deadline_margin_s=client.deadline_margin_s,
        max_message_bytes=max_message_bytes,
        tls=client.tls,
        telemetry=telemetry,
    )
