"""CRM store on SQLAlchemy async: SQLite file embedded, PostgreSQL in production."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, func, select
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
from shared.errors import AgentmeshError, InvalidArgument, NotFound

OPEN_TICKET_STATES = ("open", "pending")
MAX_NAME_MATCHES = 5


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

    async def lookup(
        self,
        *,
        customer_id: str | None = None,
        email: str | None = None,
        name: str | None = None,
    ) -> JsonDict:
        given = [v for v in (customer_id, email, name) if v]
        if len(given) != 1:
            raise InvalidArgument("customer_id", "give exactly one of customer_id, email, name")
        try:
            async with self._engine.connect() as conn:
                return await self._lookup(conn, customer_id, email, name)
        except AgentmeshError:
            raise
        except SQLAlchemyError as exc:
            if is_unavailable_error(exc) or isinstance(exc.__cause__, OSError):
                raise unavailable("CRM") from exc
            raise
        except OSError as exc:
            raise unavailable("CRM") from exc

    async def _lookup(
        self,
        conn: AsyncConnection,
        customer_id: str | None,
        email: str | None,
        name: str | None,
    ) -> JsonDict:
        query = select(crm_customers)
        if customer_id:
            query = query.where(crm_customers.c.id == customer_id)
        elif email:
            query = query.where(func.lower(crm_customers.c.email) == email.strip().lower())
        else:
            assert name is not None
            pattern = "%" + name.strip().lower().replace("%", "").replace("_", "") + "%"
            query = (
                query.where(crm_customers.c.name_lower.like(pattern))
                .order_by(crm_customers.c.name, crm_customers.c.id)
                .limit(MAX_NAME_MATCHES + 1)
            )
        rows = (await conn.execute(query)).all()
        if not rows:
            key = "customer_id" if customer_id else "email" if email else "name"
            raise NotFound(f"no customer matches that {key}")
        if len(rows) > 1:
            return {
                "matches": [
                    {"customer_id": r.id, "name": r.name, "email": r.email, "company": r.company}
                    for r in rows[:MAX_NAME_MATCHES]
                ],
                "more_matches": len(rows) > MAX_NAME_MATCHES,
                "note": "several customers match; ask which one, then look up by customer_id",
            }
        return await self._profile(conn, rows[0])

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
