"""CRM store on SQLAlchemy async: SQLite file embedded, PostgreSQL in production."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Row, and_, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.tools.adapters.base import JsonDict
from services.tools.adapters.sql import (
    CRM_TABLES,
    backend_name,
    create_tables,
    crm_accounts,
    crm_contacts,
    crm_customers,
    crm_interactions,
    crm_tickets,
    insert_rows,
    is_empty,
    is_unavailable_error,
    row_dict,
    unavailable,
    writer,
)
from shared.errors import AgentmeshError, NotFound

OPEN_TICKET_STATES = ("open", "pending")


class SqlCrmStore:
    """Customers with their account, contacts, tickets and interaction history."""

    def __init__(self, engine: AsyncEngine, *, url: str, schema: str | None = None) -> None:
        self._engine = engine
        self._schema = schema
        self.source = f"crm:{backend_name(url)}"

    async def create_schema(self) -> None:
        await create_tables(self._engine, CRM_TABLES, schema=self._schema)

    async def seed(self, rows: dict[str, list[dict[str, Any]]]) -> bool:
        """Insert the demo data set into an empty store; False when it already holds data."""
        try:
            async with writer(self._engine).begin() as conn:
                if not await is_empty(conn, crm_customers):
                    return False
                await insert_rows(conn, {table: rows[table.name] for table in CRM_TABLES})
        except IntegrityError:
            return False  # another replica seeded it concurrently
        return True

    async def lookup(self, customer_id: str) -> JsonDict:
        return await self._find(
            crm_customers.c.id == customer_id, "no customer matches that customer_id"
        )

    async def find_by_email(self, email: str, *, customer_id: str | None = None) -> JsonDict:
        condition = func.lower(crm_customers.c.email) == email.strip().lower()
        if customer_id is not None:
            condition = and_(condition, crm_customers.c.id == customer_id)
        return await self._find(condition, "no customer matches that email")

    async def _find(self, condition: ColumnElement[bool], not_found: str) -> JsonDict:
        """The profile of the one customer ``condition`` selects."""
        try:
            async with self._engine.connect() as conn:
                row = (await conn.execute(select(crm_customers).where(condition))).first()
                if row is None:
                    raise NotFound(not_found)
                return await self._profile(conn, row)
        except AgentmeshError:
            raise
        except SQLAlchemyError as exc:
            if is_unavailable_error(exc) or isinstance(exc.__cause__, OSError):
                raise unavailable("CRM") from exc
            raise
        except OSError as exc:
            raise unavailable("CRM") from exc

    async def _profile(self, conn: AsyncConnection, customer: Row[Any]) -> JsonDict:
        cid = customer.id
        account = (
            await conn.execute(select(crm_accounts).where(crm_accounts.c.customer_id == cid))
        ).first()
        contacts = (
            await conn.execute(
                select(crm_contacts)
                .where(crm_contacts.c.customer_id == cid)
                .order_by(crm_contacts.c.is_primary.desc(), crm_contacts.c.id)
            )
        ).all()
        tickets = (
            await conn.execute(
                select(crm_tickets)
                .where(
                    crm_tickets.c.customer_id == cid,
                    crm_tickets.c.status.in_(OPEN_TICKET_STATES),
                )
                .order_by(crm_tickets.c.updated_at.desc(), crm_tickets.c.id)
            )
        ).all()
        interactions = (
            await conn.execute(
                select(crm_interactions)
                .where(crm_interactions.c.customer_id == cid)
                .order_by(crm_interactions.c.occurred_at.desc(), crm_interactions.c.id)
                .limit(5)
            )
        ).all()
        profile = row_dict(customer)
        profile.pop("name_lower", None)
        profile["customer_id"] = profile.pop("id")
        return {
            "customer": profile,
            "account": _strip(row_dict(account), "customer_id") if account is not None else None,
            "contacts": [
                {**_strip(row_dict(c), "customer_id", "is_primary"), "primary": bool(c.is_primary)}
                for c in contacts
            ],
            "open_tickets": [_strip(row_dict(t), "customer_id") for t in tickets],
            "recent_interactions": [_strip(row_dict(i), "customer_id") for i in interactions],
        }


def _strip(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in keys}
