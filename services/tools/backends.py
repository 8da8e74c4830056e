"""Builds the adapters the configuration asks for, seeds empty stores, and closes them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from services.tools.adapters.base import BillingStore, CrmStore, KnowledgeBaseSearch
from services.tools.adapters.billing_http import HttpBillingStore
from services.tools.adapters.billing_sql import SqlBillingStore
from services.tools.adapters.crm_sql import SqlCrmStore
from services.tools.adapters.kb import (
    Embedder,
    KnowledgeBase,
    LocalVectorIndex,
    MiniLmEmbedder,
    QdrantVectorIndex,
    VectorIndex,
)
from services.tools.adapters.sql import create_engine
from services.tools.config import ToolsSettings
from services.tools.demo_data import DemoDataset, build_demo_dataset

log = logging.getLogger("agentmesh.tools")

Closer = Callable[[], Awaitable[None]]


@dataclass
class Backends:
    crm: CrmStore
    kb: KnowledgeBaseSearch
    billing: BillingStore
    closers: list[Closer] = field(default_factory=list)

    async def close(self) -> None:
        await close_all(self.closers)


async def close_all(closers: list[Closer]) -> None:
    """Run ``closers`` last-opened first; one failing does not stop the others."""
    while closers:
        close = closers.pop()
        try:
            await close()
        except Exception:
            log.exception("closing a tool backend failed")


class _Engines:
    """One engine per distinct URL (CRM and billing share it on the default SQLite file)."""

    def __init__(self, settings: ToolsSettings) -> None:
        self._settings = settings
        self._engines: dict[str, AsyncEngine] = {}

    def get(self, url: str) -> AsyncEngine:
        if url not in self._engines:
            self._engines[url] = create_engine(
                url,
                schema=self._settings.database_schema,
                pool_size=self._settings.database_pool_size,
            )
        return self._engines[url]

    async def dispose(self) -> None:
        for engine in self._engines.values():
            await engine.dispose()


def build_vector_index(settings: ToolsSettings) -> VectorIndex:
    if settings.kb_backend == "qdrant":
        return QdrantVectorIndex.create(
            collection=settings.qdrant_collection,
            url=settings.qdrant_url,
            path=None if settings.qdrant_url else settings.kb_dir() / "qdrant",
            api_key=settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None,
        )
    return LocalVectorIndex(settings.kb_dir() / "local")


async def open_backends(
    settings: ToolsSettings,
    *,
    embedder: Embedder | None = None,
    dataset: DemoDataset | None = None,
) -> Backends:
    """Open (and on first start seed) the CRM, billing and knowledge-base backends."""
    seed = settings.seed_demo_data
    if seed and dataset is None:
        dataset = build_demo_dataset()
    engines = _Engines(settings)
    closers: list[Closer] = [engines.dispose]
    try:
        crm_url = settings.resolved_crm_url()
        crm = SqlCrmStore(engines.get(crm_url), url=crm_url, schema=settings.database_schema)
        await crm.create_schema()
        if seed and dataset is not None and await crm.seed(dataset.crm):
            log.info("seeded the CRM with %d demo customers", dataset.customer_count)

        billing: BillingStore
        if settings.billing_backend == "http":
            token = settings.billing_api_token
            http = HttpBillingStore.create(
                settings.billing_api_url,
                timeout_s=settings.billing_api_timeout_s,
                token=token.get_secret_value() if token else None,
            )
            closers.append(http.close)
            billing = http
        else:
            billing_url = settings.resolved_billing_url()
            sql_billing = SqlBillingStore(
                engines.get(billing_url), url=billing_url, schema=settings.database_schema
            )
            await sql_billing.create_schema()
            if seed and dataset is not None and await sql_billing.seed(dataset.billing):
                log.info("seeded billing with demo invoices and payments")
            billing = sql_billing

        if embedder is None:
            embedder = await MiniLmEmbedder.load(
                settings.embedding_model_path, threads=settings.embedding_threads
            )
        kb = KnowledgeBase(
            embedder, build_vector_index(settings), dense_weight=settings.kb_dense_weight
        )
        closers.append(kb.close)
        if await kb.start(dataset.articles if (seed and dataset is not None) else None):
            log.info("built the knowledge-base index (%d articles)", kb.article_count)
    except BaseException:
        await close_all(closers)
        raise
    return Backends(crm=crm, kb=kb, billing=billing, closers=closers)
