"""A secure mesh: fake inference and tools servers and the real orchestrator, every hop over
mTLS with scoped bearer tokens; the fixtures hand out credentials and channels."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from agentmesh.inference.v1 import inference_pb2_grpc
from agentmesh.tools.v1 import tools_pb2_grpc

from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.loop.policy import Caps
from services.orchestrator.service import OrchestratorService
from shared.auth import SCOPE_AGENT_ADMIN, SCOPE_AGENT_RUN, SCOPE_INFERENCE_CALL, SCOPE_TOOLS_CALL
from shared.config import AuthSettings, ClientSettings, ServiceSettings
from shared.server import GrpcServer
from tests.orchestrator.grpc_fakes import FakeInferenceServicer, FakeService, FakeToolServicer
from tests.security.pki import SERVICE_NAMES, JwtIssuer, Pki, Tokens, make_pki


@dataclass
class SecureMesh:
    pki: Pki
    tokens: Tokens
    jwt: JwtIssuer
    orchestrator: GrpcServer
    inference: GrpcServer
    tools: GrpcServer
    servers: list[GrpcServer] = field(default_factory=list)

    def channel(
        self,
        server: GrpcServer,
        *,
        client: str = "client",
        rogue: bool = False,
        server_name: str | None = None,
        service: str = "orchestrator",
    ) -> grpc.aio.Channel:
        cert, key = self.pki.read(client, rogue=rogue)
        credentials = grpc.ssl_channel_credentials(
            self.pki.ca_file.read_bytes(), private_key=key, certificate_chain=cert
        )
        name = server_name or SERVICE_NAMES[service]
        return grpc.aio.secure_channel(
            f"127.0.0.1:{server.port}",
            credentials,
            options=[("grpc.ssl_target_name_override", name)],
        )

    def header(self, principal: str) -> tuple[tuple[str, str]]:
        return self.tokens.header(principal)


def _fake(kind: str, settings: ServiceSettings) -> tuple[FakeService, Any]:
    if kind == "inference":
        inference = FakeInferenceServicer()
        return FakeService(
            "inference",
            ["agentmesh.inference.v1.InferenceService"],
            inference,
            inference_pb2_grpc.add_InferenceServiceServicer_to_server,
        ), inference
    tools = FakeToolServicer()
    return FakeService(
        "tools",
        ["agentmesh.tools.v1.ToolService"],
        tools,
        tools_pb2_grpc.add_ToolServiceServicer_to_server,
    ), tools


async def _serve(service: Any, settings: ServiceSettings) -> GrpcServer:
    server = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
    await server.start()
    await server.wait_until_serving(20)
    return server


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secure_mesh(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SecureMesh]:
    folder = tmp_path_factory.mktemp("secure-mesh")
    tokens = Tokens()
    service_token = tokens.add("orchestrator", SCOPE_INFERENCE_CALL, SCOPE_TOOLS_CALL)
    tokens.add("alice", SCOPE_AGENT_RUN)
    tokens.add("bob", SCOPE_AGENT_RUN)
    tokens.add("admin", SCOPE_AGENT_RUN, SCOPE_AGENT_ADMIN)
    tokens.add("tools-only", SCOPE_TOOLS_CALL)
    issuer = JwtIssuer.create(folder)
    auth = AuthSettings(
        static_keys=tokens.keys,
        jwks_file=issuer.jwks_file,
        jwt_issuer=issuer.issuer,
        jwt_audience=issuer.audience,
    )
    servers: list[GrpcServer] = []
    try:
        downstream = {}
        for kind in ("inference", "tools"):
            settings = ServiceSettings(
                port=0, metrics_port=0, grace_seconds=1, tls=pki.server_tls(kind), auth=auth
            )
            service, _ = _fake(kind, settings)
            servers.append(await _serve(service, settings))
            downstream[kind] = ClientSettings(
                target=f"127.0.0.1:{servers[-1].port}",
                auth_token=service_token,
                tls=pki.client_tls("orchestrator", kind),
            )
        settings = OrchestratorSettings(
            port=0,
            metrics_port=0,
            grace_seconds=1,
            tls=pki.server_tls("orchestrator"),
            auth=auth,
            inference=downstream["inference"],
            tools=downstream["tools"],
            session_store_url=f"sqlite+aiosqlite:///{folder / 'sessions.sqlite'}",
            caps=Caps(turn_budget_s=20, task_budget_s=200),
            dependency_wait_s=20,
        )
        orchestrator = OrchestratorService(settings)
        servers.append(await _serve(orchestrator, settings))
        yield SecureMesh(pki, tokens, issuer, servers[2], servers[0], servers[1], servers)
    finally:
        for server in reversed(servers):
            await server.stop(grace=0.5)


# ---- the fuzz suite's profiles and its per-RPC case counts ---------------------------------

FUZZ_COUNTS = pytest.StashKey[dict[str, dict[str, int]]]()


def _register_fuzz_profiles() -> None:
    import datetime
    import os

    from hypothesis import HealthCheck
    from hypothesis import settings as hsettings

    common: dict[str, Any] = {
        "database": None,
        "suppress_health_check": [
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
        "print_blob": True,
        # A hang guard for one case, not a timing assertion.
        "deadline": datetime.timedelta(seconds=60),
    }
    # `make test`: deterministic and bounded (seconds per RPC on 2 cores).
    hsettings.register_profile("agentmesh-bounded", max_examples=60, derandomize=True, **common)
    # `make fuzz`: the long run, a fresh random seed each time.
    hsettings.register_profile("agentmesh-long", max_examples=1000, **common)
    hsettings.load_profile(os.environ.get("AGENTMESH_FUZZ_PROFILE", "agentmesh-bounded"))


_register_fuzz_profiles()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    counts = config.stash.get(FUZZ_COUNTS, None)
    if not counts:
        return
    terminalreporter.section("fuzz cases per RPC")
    total = undefined = 0
    for rpc, row in sorted(counts.items()):
        total += row["cases"]
        undefined += row["undefined"]
        codes = ", ".join(
            f"{k}={v}" for k, v in sorted(row.items()) if k not in {"cases", "undefined"}
        )
        terminalreporter.write_line(
            f"{rpc}: {row['cases']} cases, {row['undefined']} undefined ({codes})"
        )
    terminalreporter.write_line(f"total: {total} cases, {undefined} undefined statuses")
