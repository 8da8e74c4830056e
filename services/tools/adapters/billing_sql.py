"""Billing store on SQLAlchemy async, with idempotent money movements.

Exactly-once writes do not rely on an in-process lock (that would not hold across
replicas): each write inserts its idempotency key into ``billing_idempotency`` (primary
key) in the same transaction that moves the money. A concurrent duplicate blocks on that
key until the first transaction ends; then it either fails the unique constraint and
replays the stored result, or (first one rolled back) runs itself. The invoice or account
row is locked (``FOR UPDATE`` on PostgreSQL; SQLite serialises writers with
``BEGIN IMMEDIATE``) so two different refunds cannot together exceed what was paid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.tools.adapters.base import JsonDict, WriteOutcome
from services.tools.adapters.sql import (
    BILLING_TABLES,
    backend_name,
    billing_accounts,
    billing_credits,
    billing_idempotency,
    billing_invoices,
    billing_payments,
    billing_refunds,
    billing_subscriptions,
    create_tables,
    insert_rows,
    is_empty,
    is_unavailable_error,
    iso,
    row_dict,
    unavailable,
    writer,
)
from shared.errors import AgentmeshError, FailedPrecondition, NotFound, Unavailable

# Payments that took money from the customer (refunds are tracked on the invoice).
_COLLECTED = ("succeeded",)
_MAX_IDEMPOTENCY_ATTEMPTS = 5


def money(cents: int) -> float:
    """Cents as currency units for the model (49.0 for 4900)."""
    return round(cents / 100, 2)


def request_fingerprint(operation: str, request: dict[str, Any]) -> str:
    canonical = json.dumps({"op": operation, **request}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


class SqlBillingStore:
    """Invoices, payments, subscriptions, refunds and credits."""

    def __init__(self, engine: AsyncEngine, *, url: str, schema: str | None = None) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self._schema = schema
        self.source = f"billing:{backend_name(url)}"

    async def create_schema(self) -> None:
        await create_tables(self._engine, BILLING_TABLES, schema=self._schema)

    async def seed(self, rows: dict[str, list[dict[str, Any]]]) -> bool:
        """Insert the demo data set into an empty store; False when it already holds data."""
        tables = [t for t in BILLING_TABLES if t.name in rows]
        try:
            async with self._writer.begin() as conn:
                if not await is_empty(conn, billing_accounts):
                    return False
                await insert_rows(conn, {table: rows[table.name] for table in tables})
        except IntegrityError:
            return False
        return True

    # --- reads --------------------------------------------------------------------------
    async def overview(
        self, customer_id: str, *, invoice_id: str | None = None, limit: int = 6
    ) -> JsonDict:
        async def run() -> JsonDict:
            async with self._engine.connect() as conn:
                return await self._overview(conn, customer_id, invoice_id, limit)

        result: JsonDict = await self._guard(run)
        return result

    async def _overview(
        self, conn: AsyncConnection, customer_id: str, invoice_id: str | None, limit: int
    ) -> JsonDict:
        account = (
            await conn.execute(
                select(billing_accounts).where(billing_accounts.c.customer_id == customer_id)
            )
        ).first()
        if account is None:
            raise NotFound("no billing account for that customer_id")
        subscription = (
            await conn.execute(
                select(billing_subscriptions)
                .where(billing_subscriptions.c.customer_id == customer_id)
                .order_by(billing_subscriptions.c.started_at.desc())
            )
        ).first()
        query = select(billing_invoices).where(billing_invoices.c.customer_id == customer_id)
        if invoice_id:
            query = query.where(billing_invoices.c.id == invoice_id)
        invoices = (
            await conn.execute(
                query.order_by(
                    billing_invoices.c.issued_at.desc(), billing_invoices.c.id.desc()
                ).limit(limit)
            )
        ).all()
        if invoice_id and not invoices:
            raise NotFound("no invoice with that invoice_id for this customer")
        ids = [inv.id for inv in invoices]
        payments_by_invoice: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        if ids:
            payments = (
                await conn.execute(
                    select(billing_payments)
                    .where(billing_payments.c.invoice_id.in_(ids))
                    .order_by(billing_payments.c.created_at, billing_payments.c.id)
                )
            ).all()
            for p in payments:
                payments_by_invoice[p.invoice_id].append(
                    {
                        "payment_id": p.id,
                        "amount": money(p.amount_cents),
                        "status": p.status,
                        "method": p.method,
                        "failure_reason": p.failure_reason,
                        "created_at": iso(p.created_at),
                    }
                )
        alerts: list[str] = []
        rendered = []
        for inv in invoices:
            pays = payments_by_invoice[inv.id]
            collected = [p for p in pays if p["status"] in _COLLECTED]
            failed = [p for p in pays if p["status"] == "failed"]
            double = len(collected) > 1
            if double:
                alerts.append(f"{inv.id} was charged {len(collected)} times")
            if failed and not collected:
                alerts.append(f"{inv.id} is unpaid after a failed payment")
            rendered.append(
                {
                    "invoice_id": inv.id,
                    "description": inv.description,
                    "amount": money(inv.amount_cents),
                    "currency": inv.currency,
                    "status": inv.status,
                    "refunded": money(inv.refunded_cents),
                    "issued_at": iso(inv.issued_at),
                    "due_at": iso(inv.due_at),
                    "double_charged": double,
                    "payments": pays,
                }
            )
        sub = None
        if subscription is not None:
            sub = row_dict(subscription)
            sub["subscription_id"] = sub.pop("id")
            sub.pop("customer_id")
            sub["price"] = money(sub.pop("price_cents"))
        return {
            "customer_id": customer_id,
            "name": account.name,
            "currency": account.currency,
            "payment_method": account.payment_method,
            "credit_balance": money(account.credit_balance_cents),
            "subscription": sub,
            "invoices": rendered,
            "alerts": alerts,
        }

    # --- writes -------------------------------------------------------------------------
    async def refund(
        self,
        *,
        customer_id: str,
        invoice_id: str,
        amount_cents: int,
        reason: str,
        idempotency_key: str,
    ) -> WriteOutcome:
        # The customer is part of the request: a key replayed for another customer is
        # "used with different arguments", never that customer's stored result.
        request = {
            "customer_id": customer_id,
            "invoice_id": invoice_id,
            "amount_cents": amount_cents,
            "reason": reason,
        }

        async def perform(conn: AsyncConnection) -> JsonDict:
            inv = (
                await conn.execute(
                    select(billing_invoices)
                    .where(
                        billing_invoices.c.id == invoice_id,
                        billing_invoices.c.customer_id == customer_id,
                    )
                    .with_for_update()
                )
            ).first()
            if inv is None:  # unknown, or another customer's: the same words either way
                raise NotFound("no invoice with that invoice_id")
            paid = (
                await conn.execute(
                    select(func.coalesce(func.sum(billing_payments.c.amount_cents), 0)).where(
                        billing_payments.c.invoice_id == invoice_id,
                        billing_payments.c.status.in_(_COLLECTED),
                    )
                )
            ).scalar_one()
            refundable = int(paid) - int(inv.refunded_cents)
            if amount_cents > refundable:
                raise FailedPrecondition(
                    f"refund of {money(amount_cents)} {inv.currency} exceeds the refundable "
                    f"amount of {money(max(refundable, 0))} {inv.currency} on {invoice_id}"
                )
            refunded = int(inv.refunded_cents) + amount_cents
            if refunded >= int(paid):
                status = "refunded"
            elif int(paid) - refunded >= int(inv.amount_cents):
                status = "paid"  # e.g. the duplicate of a double charge was returned
            else:
                status = "partially_refunded"
            now = _now()
            refund_id = "RF-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:12].upper()
            await conn.execute(
                billing_refunds.insert().values(
                    id=refund_id,
                    invoice_id=invoice_id,
                    amount_cents=amount_cents,
                    reason=reason,
                    idempotency_key=idempotency_key,
                    created_at=now,
                )
            )
            await conn.execute(
                billing_invoices.update()
                .where(billing_invoices.c.id == invoice_id)
                .values(refunded_cents=refunded, status=status)
            )
            return {
                "refund_id": refund_id,
                "invoice_id": invoice_id,
                "customer_id": inv.customer_id,
                "amount": money(amount_cents),
                "currency": inv.currency,
                "invoice_status": status,
                "invoice_refunded_total": money(refunded),
                "refundable_remaining": money(int(paid) - refunded),
                "reason": reason,
                "created_at": iso(now),
            }

        return await self._idempotent("refund", idempotency_key, request, perform)

    async def credit(
        self, *, customer_id: str, amount_cents: int, reason: str, idempotency_key: str
    ) -> WriteOutcome:
        request = {"customer_id": customer_id, "amount_cents": amount_cents, "reason": reason}

        async def perform(conn: AsyncConnection) -> JsonDict:
            account = (
                await conn.execute(
                    select(billing_accounts)
                    .where(billing_accounts.c.customer_id == customer_id)
                    .with_for_update()
                )
            ).first()
            if account is None:
                raise NotFound("no billing account for that customer_id")
            balance = int(account.credit_balance_cents) + amount_cents
            now = _now()
            credit_id = "CR-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:12].upper()
            await conn.execute(
                billing_credits.insert().values(
                    id=credit_id,
                    customer_id=customer_id,
                    amount_cents=amount_cents,
                    reason=reason,
                    idempotency_key=idempotency_key,
                    created_at=now,
                )
            )
            await conn.execute(
                billing_accounts.update()
                .where(billing_accounts.c.customer_id == customer_id)
                .values(credit_balance_cents=balance)
            )
            return {
                "credit_id": credit_id,
                "customer_id": customer_id,
                "amount": money(amount_cents),
                "currency": account.currency,
                "credit_balance": money(balance),
                "reason": reason,
                "created_at": iso(now),
            }

        return await self._idempotent("credit", idempotency_key, request, perform)

    async def _idempotent(
        self,
        operation: str,
        key: str,
        request: dict[str, Any],
        perform: Callable[[AsyncConnection], Awaitable[JsonDict]],
    ) -> WriteOutcome:
        fingerprint = request_fingerprint(operation, request)

        async def attempt() -> WriteOutcome | None:
            try:
                async with self._writer.begin() as conn:
                    stored = (
                        await conn.execute(
                            select(billing_idempotency).where(
                                billing_idempotency.c.idempotency_key == key
                            )
                        )
                    ).first()
                    if stored is not None:
                        return self._replay(stored, operation, fingerprint)
                    # Claims the key; a concurrent duplicate waits here for our outcome.
                    await conn.execute(
                        billing_idempotency.insert().values(
                            idempotency_key=key,
                            operation=operation,
                            request_hash=fingerprint,
                            result_json="",
                            created_at=_now(),
                        )
                    )
                    result = await perform(conn)
                    await conn.execute(
                        billing_idempotency.update()
                        .where(billing_idempotency.c.idempotency_key == key)
                        .values(result_json=json.dumps(result))
                    )
                    return WriteOutcome(result=result, replayed=False)
            except IntegrityError:
                return None  # a duplicate committed first: read its result next time

        for _ in range(_MAX_IDEMPOTENCY_ATTEMPTS):
            outcome: WriteOutcome | None = await self._guard(attempt)
            if outcome is not None:
                return outcome
        raise Unavailable("the billing store is busy; try again shortly")

    @staticmethod
    def _replay(stored: Any, operation: str, fingerprint: str) -> WriteOutcome:
        if stored.operation != operation or stored.request_hash != fingerprint:
            raise FailedPrecondition(
                "this idempotency key was already used with different arguments",
                reason="IDEMPOTENCY_KEY_REUSED",
            )
        return WriteOutcome(result=json.loads(stored.result_json), replayed=True)

    async def _guard(self, run: Callable[[], Awaitable[Any]]) -> Any:
        """Map 'database unreachable' to UNAVAILABLE; domain errors pass through."""
        try:
            return await run()
        except AgentmeshError:
            raise
        except SQLAlchemyError as exc:
            if is_unavailable_error(exc) or isinstance(exc.__cause__, OSError):
                raise unavailable("billing") from exc
            raise
        except OSError as exc:
            raise unavailable("billing") from exc
