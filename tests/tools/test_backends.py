"""Backends chosen by configuration: Qdrant for the KB, PostgreSQL for CRM and billing."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.tools.backends import open_backends
from services.tools.demo_data import DemoDataset
from tests.tools.conftest import POSTGRES_URL, tools_settings
from tests.tools.fakes import HashEmbedder


async def test_qdrant_backend_from_settings(tmp_path: Path, dataset: DemoDataset) -> None:
    settings = tools_settings(tmp_path, kb_backend="qdrant")
    backends = await open_backends(settings, embedder=HashEmbedder(), dataset=dataset)
    try:
        assert backends.kb.source == "kb:qdrant"
        result = await backends.kb.search("Error E204 read-only workspace", top_k=3)
        assert "KB-1052" in [r["article_id"] for r in result["results"]]
    finally:
        await backends.close()
    assert (tmp_path / "kb" / "qdrant").is_dir()


@pytest.mark.postgres
async def test_postgres_stores_from_settings(tmp_path: Path, dataset: DemoDataset) -> None:
    schema = f"tools_test_{uuid.uuid4().hex[:12]}"
    settings = tools_settings(
        tmp_path,
        crm_database_url=POSTGRES_URL,
        billing_database_url=POSTGRES_URL,
        database_schema=schema,
    )
    try:
        backends = await open_backends(settings, embedder=HashEmbedder(), dataset=dataset)
        try:
            assert backends.crm.source == "crm:postgres"
            assert backends.billing.source == "billing:postgres"
            profile = await backends.crm.lookup("CUST-0002")
            assert profile["account"]["status"] == "past_due"
            overview = await backends.billing.overview("CUST-0002")
            assert overview["subscription"]["status"] == "past_due"
        finally:
            await backends.close()
        # a second start finds the schema populated and does not seed again
        again = await open_backends(settings, embedder=HashEmbedder(), dataset=dataset)
        await again.close()
        admin = create_async_engine(POSTGRES_URL)
        async with admin.connect() as conn:
            count = (
                await conn.execute(text(f'SELECT count(*) FROM "{schema}".crm_customers'))
            ).scalar_one()
        await admin.dispose()
        assert count == dataset.customer_count
    finally:
        admin = create_async_engine(POSTGRES_URL)
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()
