"""Fixtures of the tool service tests: stores on SQLite and PostgreSQL, servers, the model."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agentmesh.tools.v1 import tools_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.tools.adapters.billing_sql import SqlBillingStore
from services.tools.adapters.crm_sql import SqlCrmStore
from services.tools.adapters.kb import MiniLmEmbedder
from services.tools.adapters.sql import create_engine
from services.tools.backends import open_backends
from services.tools.config import ToolsSettings
from services.tools.demo_data import DemoDataset, build_demo_dataset
from services.tools.principal import PRINCIPAL_HEADER
from services.tools.service import ToolsService
from shared.server import GrpcServer
from tests.tools.fakes import HashEmbedder

POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
# Store tests use a smaller slice of the same generator (the showcase customers included).
TEST_CUSTOMERS = 40


@dataclass
class Database:
    backend: str
    url: str
    schema: str | None
    engine: AsyncEngine


@pytest.fixture(scope="session")
def dataset() -> DemoDataset:
    return build_demo_dataset(customers=TEST_CUSTOMERS)


@pytest.fixture(scope="session")
def full_dataset() -> DemoDataset:
    return build_demo_dataset()


@contextlib.asynccontextmanager
async def open_database(backend: str, folder: Path) -> AsyncIterator[Database]:
    """A fresh database: an SQLite file, or a PostgreSQL schema unique to this test."""
    if backend == "sqlite":
        url, schema = f"sqlite+aiosqlite:///{folder / 'tools.sqlite'}", None
    else:
        url, schema = POSTGRES_URL, f"tools_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(url, schema=schema)
    try:
        yield Database(backend, url, schema, engine)
    finally:
        await engine.dispose()
        if schema:
            admin = create_async_engine(POSTGRES_URL)
            async with admin.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with open_database(request.param, tmp_path) as db:
        yield db


@pytest.fixture
async def crm(database: Database, dataset: DemoDataset) -> SqlCrmStore:
    store = SqlCrmStore(database.engine, url=database.url, schema=database.schema)
    await store.create_schema()
    assert await store.seed(dataset.crm)
    return store


@pytest.fixture
async def billing(database: Database, dataset: DemoDataset) -> SqlBillingStore:
    store = SqlBillingStore(database.engine, url=database.url, schema=database.schema)
    await store.create_schema()
    assert await store.seed(dataset.billing)
    return store


@pytest.fixture(scope="session")
async def minilm() -> MiniLmEmbedder:
    """The real embedding model, loaded once per test session."""
    return await MiniLmEmbedder.load()


@contextlib.asynccontextmanager
async def running_server(service: ToolsService) -> AsyncIterator[GrpcServer]:
    """A real gRPC server on 127.0.0.1 port 0, warm before it is handed out."""
    server = GrpcServer(service, service.settings, metrics_registry=service.metrics_registry)
    await server.start()
    try:
        await server.wait_until_serving(300)
        yield server
    finally:
        await server.stop(grace=1)


def tools_settings(tmp_path: Path, **overrides: object) -> ToolsSettings:
    return ToolsSettings(port=0, metrics_port=0, data_dir=tmp_path, **overrides)  # type: ignore[arg-type]


Metadata = tuple[tuple[str, str], ...]


def principal_md(value: str) -> Metadata:
    """Call metadata carrying ``agentmesh-principal: value``."""
    return ((PRINCIPAL_HEADER, value),)


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields an RPC error's BadRequest detail names (none without one)."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return fields


def as_customer(customer_id: str) -> Metadata:
    return principal_md(f"customer:{customer_id}")


@contextlib.asynccontextmanager
async def serving_stub(service: ToolsService) -> AsyncIterator[tools_pb2_grpc.ToolServiceStub]:
    """A stub on a fresh server of `service` (for tests that need their own backends)."""
    async with (
        running_server(service) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield tools_pb2_grpc.ToolServiceStub(channel)


@pytest.fixture(scope="module")
async def stores_server(
    tmp_path_factory: pytest.TempPathFactory, dataset: DemoDataset
) -> AsyncIterator[GrpcServer]:
    """Real embedded stores (SQLite + local index; hashed embeddings keep it fast)."""
    settings = tools_settings(tmp_path_factory.mktemp("tools"))
    backends = await open_backends(settings, embedder=HashEmbedder(), dataset=dataset)
    async with running_server(ToolsService(settings, backends=backends)) as server:
        yield server
    await backends.close()


@pytest.fixture
async def stub(stores_server: GrpcServer) -> AsyncIterator[tools_pb2_grpc.ToolServiceStub]:
    async with grpc.aio.insecure_channel(stores_server.address) as channel:
        yield tools_pb2_grpc.ToolServiceStub(channel)
