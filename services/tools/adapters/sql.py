"""SQL tables of the CRM and billing stores, and the async engine both use.

One schema serves SQLite (embedded default) and PostgreSQL (production). Money is integer
cents. Tables carry no schema name: ``database_schema`` maps them with SQLAlchemy's
``schema_translate_map`` so tests (and tenants) can keep separate PostgreSQL schemas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from shared.errors import Unavailable
from shared.sqlite import create_sqlite_engine
from shared.sqlite import writer as writer

metadata = MetaData()

# --- CRM -------------------------------------------------------------------------------
crm_customers = Table(
    "crm_customers",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(120), nullable=False),
    Column("name_lower", String(120), nullable=False, index=True),
    Column("email", String(254), nullable=False, unique=True),
    Column("phone", String(32), nullable=False),
    Column("company", String(120), nullable=False),
    Column("segment", String(32), nullable=False),
    Column("country", String(2), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

crm_accounts = Table(
    "crm_accounts",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("customer_id", String(16), ForeignKey("crm_customers.id"), nullable=False, index=True),
    Column("plan", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("seats", Integer, nullable=False),
    Column("account_manager", String(120), nullable=False),
    Column("health_score", Integer, nullable=False),
    Column("renewal_date", DateTime(timezone=True), nullable=False),
)

crm_contacts = Table(
    "crm_contacts",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("customer_id", String(16), ForeignKey("crm_customers.id"), nullable=False, index=True),
    Column("name", String(120), nullable=False),
    Column("email", String(254), nullable=False),
    Column("role", String(64), nullable=False),
    Column("phone", String(32), nullable=False),
    Column("is_primary", Integer, nullable=False),
)

crm_tickets = Table(
    "crm_tickets",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("customer_id", String(16), ForeignKey("crm_customers.id"), nullable=False, index=True),
    Column("subject", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", String(16), nullable=False),
    Column("category", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

crm_interactions = Table(
    "crm_interactions",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("customer_id", String(16), ForeignKey("crm_customers.id"), nullable=False, index=True),
    Column("channel", String(16), nullable=False),
    Column("summary", Text, nullable=False),
    Column("agent", String(120), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
)

# --- Billing (no foreign keys into the CRM: the two may live in different databases) ------
billing_accounts = Table(
    "billing_accounts",
    metadata,
    Column("customer_id", String(16), primary_key=True),
    Column("name", String(120), nullable=False),
    Column("email", String(254), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("payment_method", String(64), nullable=False),
    Column("credit_balance_cents", BigInteger, nullable=False),
)

billing_subscriptions = Table(
    "billing_subscriptions",
    metadata,
    Column("id", String(16), primary_key=True),
    Column(
        "customer_id",
        String(16),
        ForeignKey("billing_accounts.customer_id"),
        nullable=False,
        index=True,
    ),
    Column("plan", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("price_cents", BigInteger, nullable=False),
    Column("interval", String(8), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("current_period_end", DateTime(timezone=True), nullable=False),
    Column("previous_plan", String(32), nullable=True),
    Column("plan_changed_at", DateTime(timezone=True), nullable=True),
)

billing_invoices = Table(
    "billing_invoices",
    metadata,
    Column("id", String(16), primary_key=True),
    Column(
        "customer_id",
        String(16),
        ForeignKey("billing_accounts.customer_id"),
        nullable=False,
        index=True,
    ),
    Column("description", String(200), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(24), nullable=False),
    Column("refunded_cents", BigInteger, nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
)

billing_payments = Table(
    "billing_payments",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("invoice_id", String(16), ForeignKey("billing_invoices.id"), nullable=False, index=True),
    Column("customer_id", String(16), nullable=False, index=True),
    Column("amount_cents", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("method", String(64), nullable=False),
    Column("failure_reason", String(120), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

billing_refunds = Table(
    "billing_refunds",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("invoice_id", String(16), ForeignKey("billing_invoices.id"), nullable=False, index=True),
    Column("amount_cents", BigInteger, nullable=False),
    Column("reason", String(500), nullable=False),
    Column("idempotency_key", String(200), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

billing_credits = Table(
    "billing_credits",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("customer_id", String(16), nullable=False, index=True),
    Column("amount_cents", BigInteger, nullable=False),
    Column("reason", String(500), nullable=False),
    Column("idempotency_key", String(200), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The idempotency ledger: the primary key is what makes a duplicate write impossible,
# across connections and replicas, not an in-process lock.
billing_idempotency = Table(
    "billing_idempotency",
    metadata,
    Column("idempotency_key", String(200), primary_key=True),
    Column("operation", String(16), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("result_json", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("idempotency_key", name="uq_billing_idempotency_key"),
)

Index("ix_crm_customers_email_lower", func.lower(crm_customers.c.email))

CRM_TABLES = (crm_customers, crm_accounts, crm_contacts, crm_tickets, crm_interactions)
BILLING_TABLES = (
    billing_accounts,
    billing_subscriptions,
    billing_invoices,
    billing_payments,
    billing_refunds,
    billing_credits,
    billing_idempotency,
)

# Exceptions that mean "the database is not reachable right now".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (OperationalError, OSError, ConnectionError)


def backend_name(url: str) -> str:
    """ "sqlite" or "postgres" (used in result sources such as ``crm:sqlite``)."""
    name = make_url(url).get_backend_name()
    return "postgres" if name.startswith("postgres") else name


def create_engine(url: str, *, schema: str | None = None, pool_size: int = 5) -> AsyncEngine:
    """An async engine; SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` for
    transactions opened through :func:`writer` (see :mod:`shared.sqlite`)."""
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_sqlite_engine(url)
    else:
        engine = create_async_engine(
            url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
        )
    if schema:
        engine = engine.execution_options(schema_translate_map={None: schema})
    return engine


async def create_tables(
    engine: AsyncEngine, tables: Sequence[Table], *, schema: str | None = None
) -> None:
    """Create ``tables`` (and the PostgreSQL schema) if missing."""
    try:
        async with engine.begin() as conn:
            if schema:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            await conn.run_sync(lambda sync: metadata.create_all(sync, tables=list(tables)))
    except IntegrityError:
        # Another replica created them at the same moment (PostgreSQL catalog race).
        pass


async def is_empty(conn: AsyncConnection, table: Table) -> bool:
    count = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
    return int(count) == 0


async def insert_rows(
    conn: AsyncConnection, rows_by_table: Mapping[Table, Sequence[Mapping[str, Any]]]
) -> None:
    for table, rows in rows_by_table.items():
        for start in range(0, len(rows), 500):
            chunk = [dict(r) for r in rows[start : start + 500]]
            if chunk:
                await conn.execute(table.insert(), chunk)


def unavailable(what: str) -> Unavailable:
    return Unavailable(f"the {what} store is unavailable; try again shortly")


def is_unavailable_error(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, UNAVAILABLE_ERRORS)


def iso(value: datetime | None) -> str | None:
    """ISO-8601 in UTC whatever the backend returns (SQLite gives naive datetimes)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def row_dict(row: Any) -> dict[str, Any]:
    """A result row as a JSON-ready dict (datetimes as ISO strings)."""
    return {k: (iso(v) if isinstance(v, datetime) else v) for k, v in row._mapping.items()}
