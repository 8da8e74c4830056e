"""Session-wide inference server on the real engine (embedded preset), for any test package.

Import the fixtures into a conftest (``from tests.fixtures_inference import inference_server,
inference_stack``). The engine starts once per test session (~1 minute on CPU); tests that
use it must be marked ``@pytest.mark.slow``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from services.inference.config import InferenceSettings
from services.inference.service import InferenceService
from shared.config import load_settings
from shared.server import GrpcServer

REPO = Path(__file__).resolve().parents[1]
ENGINE_START_TIMEOUT_S = 600.0


@dataclass
class InferenceStack:
    """A running inference server: where it listens and the objects behind it."""

    address: str
    server: GrpcServer
    service: InferenceService


RUNNING: pytest.StashKey[list[GrpcServer]] = pytest.StashKey()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def inference_stack(request: pytest.FixtureRequest) -> AsyncIterator[InferenceStack]:
    # The prepared model lives in the repo's var/models (prepared once, reused by every run).
    settings = load_settings(
        InferenceSettings,
        "inference",
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        preset="embedded",
        model_cache_dir=REPO / "var" / "models",
        cpu_kvcache_gib=2,
        grace_seconds=2.0,
    )
    service = InferenceService(settings)
    server = GrpcServer(service, settings)
    request.config.stash.setdefault(RUNNING, []).append(server)
    await server.start()
    try:
        await server.wait_until_serving(ENGINE_START_TIMEOUT_S)
        yield InferenceStack(server.address, server, service)
    finally:
        await server.stop(grace=2)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def inference_server(inference_stack: InferenceStack) -> str:
    """The bound ``host:port`` of the session's inference server."""
    return inference_stack.address


@pytest_asyncio.fixture(loop_scope="session")
async def without_shared_engine(request: pytest.FixtureRequest) -> None:
    """Stops the session's engine (if one runs) so a test that starts its own (``agentmesh
    up``) never has two resident. Such tests run last (tests/conftest.py orders them)."""
    for server in request.config.stash.get(RUNNING, []):
        await server.stop(grace=2)
