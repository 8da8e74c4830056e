"""Test credentials made fresh per run (no keys in the repository): a mesh CA with one
certificate per service and per client, a rogue CA, static bearer tokens and a JWKS file."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from shared.auth import hash_token, new_token
from shared.config import ClientTlsSettings, StaticKey, TlsSettings
from shared.pki import CertificateAuthority

SERVICE_NAMES = {
    "orchestrator": "orchestrator.agentmesh.internal",
    "inference": "inference.agentmesh.internal",
    "tools": "tools.agentmesh.internal",
}


@dataclass
class Pki:
    folder: Path
    ca_file: Path
    rogue_ca_file: Path
    certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    rogue_certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def server_tls(self, name: str) -> TlsSettings:
        cert, key = self.certs[name]
        return TlsSettings(cert_file=cert, key_file=key, ca_file=self.ca_file)

    def client_tls(self, name: str, server: str, *, rogue: bool = False) -> ClientTlsSettings:
        cert, key = (self.rogue_certs if rogue else self.certs)[name]
        return ClientTlsSettings(
            ca_file=self.ca_file, cert_file=cert, key_file=key, server_name=SERVICE_NAMES[server]
        )

    def read(self, name: str, *, rogue: bool = False) -> tuple[bytes, bytes]:
        cert, key = (self.rogue_certs if rogue else self.certs)[name]
        return cert.read_bytes(), key.read_bytes()


def make_pki(folder: Path) -> Pki:
    ca = CertificateAuthority.create("agentmesh test CA")
    rogue = CertificateAuthority.create("rogue CA")
    ca_file, _ = ca.write(folder, "ca")
    rogue_file, _ = rogue.write(folder, "rogue-ca")
    pki = Pki(folder, ca_file, rogue_file)
    for service, dns in SERVICE_NAMES.items():
        pki.certs[service] = ca.issue(service, [dns, "localhost", "127.0.0.1"]).write(
            folder, service
        )
    pki.certs["client"] = ca.issue("client", ["client.agentmesh.internal"]).write(folder, "client")
    pki.rogue_certs["client"] = rogue.issue("client", ["client.agentmesh.internal"]).write(
        folder, "rogue-client"
    )
    pki.rogue_certs["orchestrator"] = rogue.issue(
        "orchestrator", [SERVICE_NAMES["orchestrator"], "127.0.0.1"]
    ).write(folder, "rogue-orchestrator")
    return pki


@dataclass
class Tokens:
    """Bearer tokens by principal, and the static-key entries a server is configured with."""

    tokens: dict[str, str] = field(default_factory=dict)
    keys: list[StaticKey] = field(default_factory=list)

    def add(self, name: str, *scopes: str) -> str:
        token = new_token()
        self.tokens[name] = token
        self.keys.append(StaticKey(name=name, sha256=hash_token(token), scopes=list(scopes)))
        return token

    def header(self, name: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.tokens[name]}"),)


@dataclass
class JwtIssuer:
    """An identity provider: a signing key whose public half is in a JWKS file."""

    jwks_file: Path
    key: ec.EllipticCurvePrivateKey
    kid: str = "test-key-1"
    issuer: str = "https://idp.agentmesh.test"
    audience: str = "agentmesh"

    @classmethod
    def create(cls, folder: Path) -> JwtIssuer:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer = cls(folder / "jwks.json", key)
        jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": issuer.kid, "use": "sig", "alg": "ES256"})
        issuer.jwks_file.write_text(json.dumps({"keys": [jwk]}))
        return issuer

    def token(
        self,
        subject: str,
        scope: str,
        *,
        expires_in: float = 300,
        key: ec.EllipticCurvePrivateKey | None = None,
        audience: str | None = None,
    ) -> str:
        now = int(time.time())
        claims = {
            "sub": subject,
            "scope": scope,
            "iss": self.issuer,
            "aud": audience or self.audience,
            "iat": now,
            "exp": now + int(expires_in),
        }
        return jwt.encode(claims, key or self.key, algorithm="ES256", headers={"kid": self.kid})
