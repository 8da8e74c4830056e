"""The three services in one child process for the fuzz suite, every port on mTLS with
scoped tokens: inference over fake engines, tools on SQLite with a hashing embedder, the real
orchestrator between them. Writes its ports as JSON to --ready-file once all are SERVING and
serves until SIGTERM (the suite checks that this process never dies).

    python -m tests.security.fuzz_mesh --folder DIR --ready-file DIR/ready.json

DIR holds the PKI (ca.crt, <service>.crt/.key, client.crt/.key) and keys.json (static keys).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from services.inference.config import InferenceSettings
from services.inference.service import InferenceService
from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.loop.policy import Caps
from services.orchestrator.service import OrchestratorService
from services.tools.config import ToolsSettings
from services.tools.service import ToolsService
from shared.config import AuthSettings, ClientSettings, ClientTlsSettings, StaticKey, TlsSettings
from shared.logging import configure_logging
from shared.server import GrpcServer
from tests.inference.fakes import FakeEngineFactory
from tests.security.pki import SERVICE_NAMES
from tests.tools.fakes import HashEmbedder


def _tls(folder: Path, name: str) -> TlsSettings:
    return TlsSettings(
        cert_file=folder / f"{name}.crt", key_file=folder / f"{name}.key", ca_file=folder / "ca.crt"
    )


def _client(folder: Path, port: int, service: str, token: str) -> ClientSettings:
    return ClientSettings(
        target=f"127.0.0.1:{port}",
        auth_token=token,
        tls=ClientTlsSettings(
            ca_file=folder / "ca.crt",
            cert_file=folder / "orchestrator.crt",
            key_file=folder / "orchestrator.key",
            server_name=SERVICE_NAMES[service],
        ),
    )


async def _serve(service: Any, settings: Any) -> GrpcServer:
    server = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
    await server.start()
    await server.wait_until_serving(120)
    return server


def _announce(ready_file: Path, ports: dict[str, int]) -> None:
    partial = ready_file.with_suffix(".tmp")
    partial.write_text(json.dumps(ports))
    partial.rename(ready_file)  # the reader never sees a half-written file


async def main(folder: Path, ready_file: Path) -> int:
    keys = json.loads((folder / "keys.json").read_text())
    auth = AuthSettings(static_keys=[StaticKey.model_validate(k) for k in keys["keys"]])
    common: dict[str, Any] = {"port": 0, "metrics_port": 0, "grace_seconds": 1, "auth": auth}
    inference_settings = InferenceSettings(
        **common, tls=_tls(folder, "inference"), data_dir=folder / "inference"
    )
    inference = await _serve(
        InferenceService(inference_settings, engine_factory=FakeEngineFactory()),
        inference_settings,
    )
    tools_settings = ToolsSettings(**common, tls=_tls(folder, "tools"), data_dir=folder / "tools")
    tools_settings.data_dir.mkdir(parents=True, exist_ok=True)
    tools = await _serve(ToolsService(tools_settings, embedder=HashEmbedder()), tools_settings)
    token = keys["service_token"]
    orchestrator_settings = OrchestratorSettings(
        **common,
        tls=_tls(folder, "orchestrator"),
        inference=_client(folder, inference.port, "inference", token),
        tools=_client(folder, tools.port, "tools", token),
        session_store_url=f"sqlite+aiosqlite:///{folder / 'sessions.sqlite'}",
        caps=Caps(turn_budget_s=10, task_budget_s=100),
        dependency_wait_s=60,
    )
    orchestrator = await _serve(OrchestratorService(orchestrator_settings), orchestrator_settings)
    servers = {"inference": inference, "tools": tools, "orchestrator": orchestrator}
    _announce(ready_file, {name: s.port for name, s in servers.items()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in (orchestrator, tools, inference):
        await server.stop(grace=1)
    return 0


if __name__ == "__main__":
    import uvloop

    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args()
    configure_logging("ERROR", "text", "fuzz-mesh")
    raise SystemExit(uvloop.run(main(args.folder, args.ready_file)))
