"""Transport security: server and channel credentials from typed settings, and the rule that
plaintext is only for loopback (or when a deployment says so explicitly)."""

from __future__ import annotations

import ipaddress
from typing import Any

import grpc

from shared.config import ClientTlsSettings, TlsSettings

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def split_host(target: str) -> str:
    """The host part of ``host:port``, ``[v6]:port``, ``dns:///host:port`` or ``unix:...``."""
    if target.startswith("unix:"):
        return "localhost"
    rest = target.split("///", 1)[-1] if "///" in target else target
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if rest.count(":") > 1:  # a bare IPv6 address
        return rest
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PlaintextRefused(ValueError):
    """Plaintext to or on a non-loopback address without ``allow_plaintext``."""


def check_plaintext(where: str, host: str, allowed: bool) -> None:
    if not allowed and not is_loopback(host):
        raise PlaintextRefused(
            f"{where}: no TLS configured and {host!r} is not a loopback address; configure "
            "tls (cert_file, key_file, ca_file) or set allow_plaintext explicitly"
        )


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    root = tls.ca_file.read_bytes() if tls.ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=root,
        require_client_auth=bool(root) and tls.require_client_cert,
    )


def channel_credentials(tls: ClientTlsSettings) -> grpc.ChannelCredentials:
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ValueError("client tls: cert_file and key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes(),
        private_key=tls.key_file.read_bytes() if tls.key_file else None,
        certificate_chain=tls.cert_file.read_bytes() if tls.cert_file else None,
    )


def channel_tls_options(tls: ClientTlsSettings) -> list[tuple[str, Any]]:
    """Verify the server's certificate against ``server_name`` rather than the target host."""
    if tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []
