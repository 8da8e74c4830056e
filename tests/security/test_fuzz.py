"""Property-based fuzzing of every RPC of the three services through real servers (one child
process, mTLS, scoped tokens): random and adversarial field values, invalid UTF-8 on the
wire, truncated and random bytes, oversized requests, huge and deeply nested JSON, unknown
enum values, missing fields, 1 ms deadlines and cancellation at each stage of a stream.

Every case must get a defined status (never UNKNOWN, never INTERNAL), bad input INVALID_ARGUMENT
without the decoder's words; after each RPC's run the process is alive and health SERVING.
The per-RPC case counts are printed at the end of the run (`fuzz cases per RPC`).
Profiles: `agentmesh-bounded` (default, `make test`), `agentmesh-long` (`make fuzz`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2
from agentmesh.orchestrator.v1 import orchestrator_pb2
from agentmesh.tools.v1 import tools_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from services.inference.config import InferenceLimits
from services.orchestrator.config import OrchestratorLimits
from services.tools.config import ToolsLimits
from shared.auth import SCOPE_AGENT_ADMIN, SCOPE_AGENT_RUN, SCOPE_INFERENCE_CALL, SCOPE_TOOLS_CALL
from tests.security.conftest import FUZZ_COUNTS
from tests.security.pki import SERVICE_NAMES, Tokens, make_pki
from tests.security.strategies import Case, case, message

REPO = Path(__file__).resolve().parents[2]
UNDEFINED = {"UNKNOWN", "INTERNAL"}
LEAKS = ("Traceback", "Unexpected", "Exception", "DecodeError", "Error parsing", "RecursionError")
# A wrong-scope caller for each service (holds only another service's scope).
WRONG_SCOPE = {"orchestrator": "tools-only", "inference": "agent-only", "tools": "agent-only"}
ADMIN = {"orchestrator": "admin", "inference": "mesh", "tools": "mesh"}


@dataclass(frozen=True)
class Rpc:
    service: str  # orchestrator | inference | tools
    path: str
    request: type[Message]
    streaming: bool
    limit_bytes: int


def _rpcs() -> list[Rpc]:
    inf, tools, orch = InferenceLimits(), ToolsLimits(), OrchestratorLimits()
    i = "/agentmesh.inference.v1.InferenceService/"
    t = "/agentmesh.tools.v1.ToolService/"
    o = "/agentmesh.orchestrator.v1.AgentService/"

    def lim(limits: Any, path: str) -> int:
        return int(limits.request_bytes_limit(path))

    ipb, tpb, opb = inference_pb2, tools_pb2, orchestrator_pb2
    return [
        Rpc("inference", i + "Generate", ipb.GenerateRequest, False, lim(inf, i + "Generate")),
        Rpc("inference", i + "StreamGenerate", ipb.StreamGenerateRequest, True, lim(inf, i)),
        Rpc("inference", i + "CallTools", ipb.CallToolsRequest, False, lim(inf, i)),
        Rpc("inference", i + "ListLanes", ipb.ListLanesRequest, False, lim(inf, i)),
        Rpc("inference", i + "CountTokens", ipb.CountTokensRequest, False, lim(inf, i)),
        Rpc("tools", t + "ListTools", tpb.ListToolsRequest, False, lim(tools, t)),
        Rpc("tools", t + "ExecuteTool", tpb.ExecuteToolRequest, False, lim(tools, t)),
        Rpc("tools", t + "ExecuteTools", tpb.ExecuteToolsRequest, False, lim(tools, t)),
        Rpc("orchestrator", o + "CreateSession", opb.CreateSessionRequest, False, lim(orch, o)),
        Rpc("orchestrator", o + "GetSession", opb.GetSessionRequest, False, lim(orch, o)),
        Rpc("orchestrator", o + "EndSession", opb.EndSessionRequest, False, lim(orch, o)),
        Rpc("orchestrator", o + "RunTurn", opb.RunTurnRequest, True, lim(orch, o)),
    ]


RPCS = _rpcs()


@dataclass
class FuzzMesh:
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    channels: dict[str, grpc.Channel]
    tokens: Tokens
    sessions: list[str]

    def metadata(self, service: str, caller: str) -> list[tuple[str, str]]:
        if caller == "none":
            return []
        if caller == "bad":
            return [("authorization", "Bearer am_not-a-real-key")]
        name = WRONG_SCOPE[service] if caller == "wrong_scope" else ADMIN[service]
        return [("authorization", f"Bearer {self.tokens.tokens[name]}")]

    def health(self, service: str) -> int:
        stub = health_pb2_grpc.HealthStub(self.channels[service])
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def _channel(folder: Path, port: int, service: str) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        (folder / "ca.crt").read_bytes(),
        private_key=(folder / "client.key").read_bytes(),
        certificate_chain=(folder / "client.crt").read_bytes(),
    )
    options = [
        ("grpc.ssl_target_name_override", SERVICE_NAMES[service]),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


@pytest.fixture(scope="module")
def fuzz_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzMesh]:
    folder = tmp_path_factory.mktemp("fuzz-mesh")
    make_pki(folder)
    tokens = Tokens()
    service_token = tokens.add("mesh", SCOPE_INFERENCE_CALL, SCOPE_TOOLS_CALL)
    tokens.add("admin", SCOPE_AGENT_RUN, SCOPE_AGENT_ADMIN)
    tokens.add("tools-only", SCOPE_TOOLS_CALL)
    tokens.add("agent-only", SCOPE_AGENT_RUN)
    keys = {"keys": [k.model_dump() for k in tokens.keys], "service_token": service_token}
    (folder / "keys.json").write_text(json.dumps(keys))
    ready = folder / "ready.json"
    log = (folder / "mesh.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.security.fuzz_mesh",
            "--folder",
            str(folder),
            "--ready-file",
            str(ready),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(1200):  # the child seeds its stores and starts three servers
            if ready.exists() or process.poll() is not None:
                break
            time.sleep(0.1)
        assert process.poll() is None, (folder / "mesh.log").read_text()[-4000:]
        ports = json.loads(ready.read_text())
        channels = {name: _channel(folder, port, name) for name, port in ports.items()}
        mesh = FuzzMesh(process, ports, channels, tokens, [])
        create = channels["orchestrator"].unary_unary(
            "/agentmesh.orchestrator.v1.AgentService/CreateSession",
            request_serializer=orchestrator_pb2.CreateSessionRequest.SerializeToString,
            response_deserializer=orchestrator_pb2.CreateSessionResponse.FromString,
        )
        for customer in ("CUST-0001", "CUST-0002", "", "CUST-0003"):
            reply = create(
                orchestrator_pb2.CreateSessionRequest(customer_id=customer),
                metadata=mesh.metadata("orchestrator", "admin"),
                timeout=10,
            )
            mesh.sessions.append(reply.session.session_id)
        yield mesh
    finally:
        process.terminate()
        code = process.wait(30)
        log.close()
        assert code == 0, (folder / "mesh.log").read_text()[-4000:]


def _overrides(rpc: Rpc, mesh: FuzzMesh) -> dict[str, Any]:
    """Realistic values mixed in, so that cases get past the first check too."""
    sessions = st.sampled_from(mesh.sessions) | st.text(max_size=70)
    names = st.sampled_from(
        ["crm_lookup", "kb_search", "billing_lookup", "billing_refund", "no such tool", ""]
    )
    if rpc.service == "orchestrator":
        return {
            "session_id": sessions,
            "user_message": st.sampled_from(["Was I charged twice?", ""]) | st.text(),
        }
    if rpc.path.endswith("ExecuteTool"):
        inv = message(tools_pb2.ToolInvocation.DESCRIPTOR, overrides={"name": names})
        return {"invocation": inv}
    if rpc.path.endswith("ExecuteTools"):
        inv = message(tools_pb2.ToolInvocation.DESCRIPTOR, overrides={"name": names})
        return {"invocations": st.lists(inv, max_size=4) | st.lists(inv, min_size=33, max_size=34)}
    if rpc.service == "inference" and "messages" in rpc.request.DESCRIPTOR.fields_by_name:
        user = {"role": st.just(common_pb2.ROLE_USER), "content": st.text(max_size=40)}
        return {
            "messages": st.lists(
                message(common_pb2.ChatMessage.DESCRIPTOR, overrides=user), max_size=3
            )
        }
    return {}


def _invoke(mesh: FuzzMesh, rpc: Rpc, c: Case) -> tuple[str, str]:
    channel = mesh.channels[rpc.service]
    metadata = mesh.metadata(rpc.service, c.caller)
    timeout = 0.001 if c.mode == "deadline_1ms" else 60.0
    try:
        if rpc.streaming:
            call = channel.unary_stream(rpc.path)(c.payload, timeout=timeout, metadata=metadata)
            if c.mode == "cancel" and c.cancel_after == 0:
                call.cancel()
            for received, _ in enumerate(call, start=1):
                if c.mode == "cancel" and received >= c.cancel_after:
                    call.cancel()
            return "OK", ""
        method = channel.unary_unary(rpc.path)
        if c.mode == "cancel":
            future = method.future(c.payload, timeout=timeout, metadata=metadata)
            future.cancel()
            try:
                future.result()
            except grpc.FutureCancelledError:
                return "CANCELLED", ""
            return "OK", ""
        method(c.payload, timeout=timeout, metadata=metadata)
        return "OK", ""
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""


@pytest.mark.parametrize("rpc", RPCS, ids=[r.path.rsplit("/", 1)[-1] for r in RPCS])
def test_fuzz_rpc(rpc: Rpc, fuzz_mesh: FuzzMesh, request: pytest.FixtureRequest) -> None:
    counts = request.config.stash.setdefault(FUZZ_COUNTS, {})
    name = rpc.path.lstrip("/").replace("agentmesh.", "").replace(".v1.", ".")
    row: Counter[str] = Counter()
    overrides = _overrides(rpc, fuzz_mesh)

    @given(c=case(rpc.request, rpc.limit_bytes, overrides))
    def run(c: Case) -> None:
        code, details = _invoke(fuzz_mesh, rpc, c)
        row["cases"] += 1
        row[code] += 1
        if code in UNDEFINED:
            row["undefined"] += 1
        assert code not in UNDEFINED, (code, details, c.wire, c.mode, c.caller)
        assert not any(leak in details for leak in LEAKS), details
        if c.mode == "normal":
            assert code != "CANCELLED", details
            if c.must_be is not None:
                assert code == c.must_be, (code, details, c.wire, c.caller)
        assert fuzz_mesh.process.poll() is None

    try:
        run()
    finally:
        counts[name] = {"cases": 0, "undefined": 0, **row}
    assert fuzz_mesh.process.poll() is None, "the mesh process died"
    assert fuzz_mesh.health(rpc.service) == health_pb2.HealthCheckResponse.SERVING


def test_every_rpc_of_the_three_services_is_fuzzed() -> None:
    """The list above is written by hand: an RPC added to a service must join it."""
    services = [
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
        tools_pb2.DESCRIPTOR.services_by_name["ToolService"],
        orchestrator_pb2.DESCRIPTOR.services_by_name["AgentService"],
    ]
    declared = {
        (f"/{s.full_name}/{m.name}", m.input_type.full_name, m.server_streaming)
        for s in services
        for m in s.methods
    }
    fuzzed = {(r.path, r.request.DESCRIPTOR.full_name, r.streaming) for r in RPCS}
    assert fuzzed == declared
