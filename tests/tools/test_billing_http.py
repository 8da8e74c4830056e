"""The HTTP billing adapter against a billing API the test starts on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import func, select

from services.tools.adapters.billing_api import RunningBillingApi, start_billing_api
from services.tools.adapters.billing_http import IDEMPOTENCY_HEADER, HttpBillingStore
from services.tools.adapters.billing_sql import SqlBillingStore
from services.tools.adapters.sql import billing_refunds
from services.tools.demo_data import DemoDataset
from shared.errors import FailedPrecondition, NotFound, Unavailable
from tests.tools.conftest import Database


@pytest.fixture
async def api(billing: SqlBillingStore) -> AsyncIterator[RunningBillingApi]:
    running = await start_billing_api(billing)
    yield running
    await running.stop()


@pytest.fixture
async def client(api: RunningBillingApi) -> AsyncIterator[HttpBillingStore]:
    store = HttpBillingStore.create(api.base_url, timeout_s=10)
    yield store
    await store.close()


async def test_overview_over_http_matches_the_store(
    client: HttpBillingStore, billing: SqlBillingStore
) -> None:
    assert client.source == "billing:http"
    assert await client.overview("CUST-0001", limit=3) == await billing.overview(
        "CUST-0001", limit=3
    )
    with pytest.raises(NotFound):
        await client.overview("CUST-9999")


async def test_refund_over_http_is_exactly_once(
    client: HttpBillingStore, dataset: DemoDataset
) -> None:
    invoice = dataset.billing["billing_invoices"][0]
    args = {
        "customer_id": invoice["customer_id"],
        "invoice_id": invoice["id"],
        "amount_cents": 300,
        "reason": "goodwill",
    }
    outcomes = await asyncio.gather(
        *(client.refund(**args, idempotency_key="http-1") for _ in range(5))
    )
    assert sum(1 for o in outcomes if not o.replayed) == 1
    assert len({o.result["refund_id"] for o in outcomes}) == 1
    again = await client.refund(**args, idempotency_key="http-1")
    assert again.replayed and again.result == outcomes[0].result
    with pytest.raises(FailedPrecondition):
        await client.refund(**{**args, "amount_cents": 301}, idempotency_key="http-1")
    with pytest.raises(FailedPrecondition):
        await client.refund(**{**args, "amount_cents": 10**9}, idempotency_key="http-2")
    with pytest.raises(NotFound):
        await client.refund(**{**args, "invoice_id": "INV-99999"}, idempotency_key="http-3")


async def test_refund_over_http_is_scoped_to_the_customer(
    client: HttpBillingStore, api: RunningBillingApi, dataset: DemoDataset, database: Database
) -> None:
    foreign = next(
        i for i in dataset.billing["billing_invoices"] if i["customer_id"] == "CUST-0002"
    )
    args = {"invoice_id": foreign["id"], "amount_cents": 100, "reason": "not mine"}
    with pytest.raises(NotFound) as caught:
        await client.refund(customer_id="CUST-0001", **args, idempotency_key="http-f1")
    with pytest.raises(NotFound) as unknown:
        await client.refund(
            customer_id="CUST-0001", **{**args, "invoice_id": "INV-99999"}, idempotency_key="f2"
        )
    assert caught.value.message == unknown.value.message
    async with database.engine.connect() as conn:
        refunds = (
            await conn.execute(
                select(func.count()).where(billing_refunds.c.invoice_id == foreign["id"])
            )
        ).scalar_one()
    assert refunds == 0
    # the reference API refuses a refund that names no customer
    async with httpx.AsyncClient(base_url=api.base_url) as raw:
        response = await raw.post("/v1/refunds", json=args, headers={IDEMPOTENCY_HEADER: "http-f3"})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "customer_id"


async def test_credit_over_http(client: HttpBillingStore, dataset: DemoDataset) -> None:
    customer_id = dataset.billing["billing_accounts"][2]["customer_id"]
    first = await client.credit(
        customer_id=customer_id, amount_cents=1000, reason="outage", idempotency_key="hc-1"
    )
    second = await client.credit(
        customer_id=customer_id, amount_cents=1000, reason="outage", idempotency_key="hc-1"
    )
    assert not first.replayed and second.replayed and first.result == second.result


async def test_unreachable_billing_api_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = HttpBillingStore.create(f"http://127.0.0.1:{port}", timeout_s=2)
    try:
        with pytest.raises(Unavailable):
            await store.overview("CUST-0001")
    finally:
        await store.close()
