"""Billing store on SQLite and PostgreSQL: reads, and money that moves exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select

from services.tools.adapters.billing_sql import SqlBillingStore
from services.tools.adapters.sql import billing_credits, billing_invoices, billing_refunds
from services.tools.demo_data import DemoDataset
from shared.errors import FailedPrecondition, NotFound
from tests.tools.conftest import Database


def _succeeded(dataset: DemoDataset, invoice_id: str) -> list[dict[str, Any]]:
    return [
        p
        for p in dataset.billing["billing_payments"]
        if p["invoice_id"] == invoice_id and p["status"] == "succeeded"
    ]


def _paid_invoice(dataset: DemoDataset, charges: int = 1) -> dict[str, Any]:
    return next(
        inv
        for inv in dataset.billing["billing_invoices"]
        if len(_succeeded(dataset, inv["id"])) == charges
    )


async def _refund_rows(database: Database, invoice_id: str) -> int:
    async with database.engine.connect() as conn:
        query = select(func.count()).where(billing_refunds.c.invoice_id == invoice_id)
        return int((await conn.execute(query)).scalar_one())


async def test_overview_flags_double_charges_and_failed_payments(
    billing: SqlBillingStore, dataset: DemoDataset, database: Database
) -> None:
    assert billing.source == f"billing:{database.backend}"
    for customer_id in ("CUST-0001", "CUST-0002"):
        result = await billing.overview(customer_id, limit=24)
        invoices = [
            i for i in dataset.billing["billing_invoices"] if i["customer_id"] == customer_id
        ]
        assert len(result["invoices"]) == len(invoices)
        for shown in result["invoices"]:
            charges = len(_succeeded(dataset, shown["invoice_id"]))
            assert shown["double_charged"] is (charges > 1)
    double = await billing.overview("CUST-0001")
    assert double["invoices"][0]["double_charged"] is True
    assert any("charged 2 times" in a for a in double["alerts"])
    failed = await billing.overview("CUST-0002")
    assert failed["subscription"]["status"] == "past_due"
    assert failed["invoices"][0]["status"] == "open"
    assert failed["invoices"][0]["payments"][0]["failure_reason"]
    changed = await billing.overview("CUST-0003")
    assert changed["subscription"]["previous_plan"] == "Growth"
    assert changed["subscription"]["plan"] == "Business"
    assert any(i["description"].startswith("Proration") for i in changed["invoices"])


async def test_overview_limit_and_single_invoice(
    billing: SqlBillingStore, dataset: DemoDataset
) -> None:
    result = await billing.overview("CUST-0004", limit=2)
    assert len(result["invoices"]) == 2
    issued = [i["issued_at"] for i in result["invoices"]]
    assert issued == sorted(issued, reverse=True)
    one = await billing.overview("CUST-0004", invoice_id=result["invoices"][1]["invoice_id"])
    assert [i["invoice_id"] for i in one["invoices"]] == [result["invoices"][1]["invoice_id"]]
    with pytest.raises(NotFound):
        await billing.overview("CUST-9999")
    with pytest.raises(NotFound):
        await billing.overview("CUST-0004", invoice_id="INV-99999")


async def test_refund_retry_returns_the_stored_result(
    billing: SqlBillingStore, dataset: DemoDataset, database: Database
) -> None:
    invoice = _paid_invoice(dataset)
    args = {
        "customer_id": invoice["customer_id"],
        "invoice_id": invoice["id"],
        "amount_cents": 1000,
        "reason": "goodwill",
    }
    first = await billing.refund(**args, idempotency_key="retry-1")
    second = await billing.refund(**args, idempotency_key="retry-1")
    assert not first.replayed and second.replayed
    assert second.result == first.result
    assert first.result["invoice_refunded_total"] == 10.0
    assert await _refund_rows(database, invoice["id"]) == 1
    overview = await billing.overview(invoice["customer_id"], invoice_id=invoice["id"])
    assert overview["invoices"][0]["refunded"] == 10.0


async def test_same_key_with_other_arguments_is_refused(
    billing: SqlBillingStore, dataset: DemoDataset, database: Database
) -> None:
    invoice = _paid_invoice(dataset)
    await billing.refund(
        customer_id=invoice["customer_id"],
        invoice_id=invoice["id"],
        amount_cents=500,
        reason="goodwill",
        idempotency_key="k-2",
    )
    with pytest.raises(FailedPrecondition) as caught:
        await billing.refund(
            customer_id=invoice["customer_id"],
            invoice_id=invoice["id"],
            amount_cents=900,
            reason="goodwill",
            idempotency_key="k-2",
        )
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
    with pytest.raises(FailedPrecondition):  # a credit cannot reuse a refund's key either
        await billing.credit(
            customer_id=invoice["customer_id"],
            amount_cents=500,
            reason="goodwill",
            idempotency_key="k-2",
        )
    assert await _refund_rows(database, invoice["id"]) == 1


async def test_concurrent_duplicates_write_once(
    billing: SqlBillingStore, dataset: DemoDataset, database: Database
) -> None:
    invoice = _paid_invoice(dataset)
    outcomes = await asyncio.gather(
        *(
            billing.refund(
                customer_id=invoice["customer_id"],
                invoice_id=invoice["id"],
                amount_cents=700,
                reason="duplicate request",
                idempotency_key="concurrent-1",
            )
            for _ in range(8)
        )
    )
    assert sum(1 for o in outcomes if not o.replayed) == 1
    assert len({o.result["refund_id"] for o in outcomes}) == 1
    assert await _refund_rows(database, invoice["id"]) == 1
    async with database.engine.connect() as conn:
        refunded = (
            await conn.execute(
                select(billing_invoices.c.refunded_cents).where(
                    billing_invoices.c.id == invoice["id"]
                )
            )
        ).scalar_one()
    assert refunded == 700


async def test_refunds_cannot_exceed_what_was_paid(
    billing: SqlBillingStore, dataset: DemoDataset, database: Database
) -> None:
    invoice = _paid_invoice(dataset)
    paid = invoice["amount_cents"]
    with pytest.raises(FailedPrecondition):
        await billing.refund(
            customer_id=invoice["customer_id"],
            invoice_id=invoice["id"],
            amount_cents=paid + 1,
            reason="too much",
            idempotency_key="over-1",
        )
    # different keys racing for the same invoice: the row lock keeps the sum within `paid`
    share = paid * 2 // 5
    results = await asyncio.gather(
        *(
            billing.refund(
                customer_id=invoice["customer_id"],
                invoice_id=invoice["id"],
                amount_cents=share,
                reason="split",
                idempotency_key=f"race-{i}",
            )
            for i in range(4)
        ),
        return_exceptions=True,
    )
    succeeded = [r for r in results if not isinstance(r, BaseException)]
    assert len(succeeded) == 2
    assert all(isinstance(r, FailedPrecondition) for r in results if isinstance(r, BaseException))
    assert await _refund_rows(database, invoice["id"]) == 2
    # a failed attempt did not burn its key: the same key works once money is available
    with pytest.raises(FailedPrecondition):
        await billing.refund(
            customer_id=invoice["customer_id"],
            invoice_id=invoice["id"],
            amount_cents=paid,
            reason="too much",
            idempotency_key="over-1",
        )


async def test_refunding_the_duplicate_of_a_double_charge_keeps_the_invoice_paid(
    billing: SqlBillingStore, dataset: DemoDataset
) -> None:
    invoice = _paid_invoice(dataset, charges=2)
    outcome = await billing.refund(
        customer_id=invoice["customer_id"],
        invoice_id=invoice["id"],
        amount_cents=invoice["amount_cents"],
        reason="double charge",
        idempotency_key="dup-1",
    )
    assert outcome.result["invoice_status"] == "paid"
    assert outcome.result["refundable_remaining"] == invoice["amount_cents"] / 100


async def test_refund_of_unknown_invoice_is_not_found(billing: SqlBillingStore) -> None:
    with pytest.raises(NotFound):
        await billing.refund(
            customer_id="CUST-0001",
            invoice_id="INV-99999",
            amount_cents=100,
            reason="x",
            idempotency_key="nf-1",
        )


def _invoice_of(dataset: DemoDataset, customer_id: str) -> dict[str, Any]:
    return next(
        inv
        for inv in dataset.billing["billing_invoices"]
        if inv["customer_id"] == customer_id and _succeeded(dataset, inv["id"])
    )


async def test_refund_of_another_customers_invoice_is_not_found_and_moves_nothing(
    billing: SqlBillingStore, dataset: DemoDataset, database: Database
) -> None:
    foreign = _invoice_of(dataset, "CUST-0002")
    with pytest.raises(NotFound) as caught:
        await billing.refund(
            customer_id="CUST-0001",
            invoice_id=foreign["id"],
            amount_cents=100,
            reason="not mine",
            idempotency_key="foreign-1",
        )
    with pytest.raises(NotFound) as unknown:
        await billing.refund(
            customer_id="CUST-0001",
            invoice_id="INV-99999",
            amount_cents=100,
            reason="not mine",
            idempotency_key="foreign-2",
        )
    assert caught.value.message == unknown.value.message  # never confirms it exists
    assert foreign["id"] not in caught.value.message
    assert await _refund_rows(database, foreign["id"]) == 0
    overview = await billing.overview("CUST-0002", invoice_id=foreign["id"])
    assert overview["invoices"][0]["refunded"] == 0.0
    # the failed attempt did not burn the key: the owner can use it for their own refund
    own = await billing.refund(
        customer_id="CUST-0002",
        invoice_id=foreign["id"],
        amount_cents=100,
        reason="not mine",
        idempotency_key="foreign-1",
    )
    assert not own.replayed and own.result["customer_id"] == "CUST-0002"


async def test_a_key_replayed_for_another_customer_never_returns_the_stored_result(
    billing: SqlBillingStore, dataset: DemoDataset, database: Database
) -> None:
    invoice = _invoice_of(dataset, "CUST-0002")
    args = {"invoice_id": invoice["id"], "amount_cents": 200, "reason": "goodwill"}
    await billing.refund(customer_id="CUST-0002", **args, idempotency_key="shared-key")
    with pytest.raises(FailedPrecondition) as caught:
        await billing.refund(customer_id="CUST-0001", **args, idempotency_key="shared-key")
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert await _refund_rows(database, invoice["id"]) == 1


async def test_lookup_of_another_customers_invoice_is_not_found(
    billing: SqlBillingStore, dataset: DemoDataset
) -> None:
    foreign = _invoice_of(dataset, "CUST-0002")
    with pytest.raises(NotFound) as caught:
        await billing.overview("CUST-0001", invoice_id=foreign["id"])
    with pytest.raises(NotFound) as unknown:
        await billing.overview("CUST-0001", invoice_id="INV-99999")
    assert caught.value.message == unknown.value.message


async def test_credit_is_idempotent_and_updates_the_balance(
    billing: SqlBillingStore, dataset: DemoDataset, database: Database
) -> None:
    account = dataset.billing["billing_accounts"][5]
    before = account["credit_balance_cents"]
    outcomes = await asyncio.gather(
        *(
            billing.credit(
                customer_id=account["customer_id"],
                amount_cents=2500,
                reason="outage",
                idempotency_key="credit-1",
            )
            for _ in range(4)
        )
    )
    assert sum(1 for o in outcomes if not o.replayed) == 1
    assert outcomes[0].result["credit_balance"] == (before + 2500) / 100
    overview = await billing.overview(account["customer_id"])
    assert overview["credit_balance"] == (before + 2500) / 100
    async with database.engine.connect() as conn:
        count = (
            await conn.execute(
                select(func.count()).where(billing_credits.c.customer_id == account["customer_id"])
            )
        ).scalar_one()
    assert count == 1
    with pytest.raises(NotFound):
        await billing.credit(
            customer_id="CUST-9999", amount_cents=100, reason="x", idempotency_key="credit-2"
        )
