"""CRM store on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import pytest

from services.tools.adapters.crm_sql import SqlCrmStore
from services.tools.adapters.sql import create_engine
from services.tools.demo_data import DemoDataset
from shared.errors import NotFound, Unavailable
from tests.tools.conftest import Database


async def test_lookup_by_id_returns_the_whole_profile(
    crm: SqlCrmStore, dataset: DemoDataset, database: Database
) -> None:
    row = dataset.crm["crm_customers"][4]
    result = await crm.lookup(row["id"])
    assert crm.source == f"crm:{database.backend}"
    assert result["customer"]["customer_id"] == row["id"]
    assert result["customer"]["email"] == row["email"]
    assert "name_lower" not in result["customer"]
    assert result["account"]["plan"] in {"Starter", "Growth", "Business", "Enterprise"}
    contacts = [c for c in dataset.crm["crm_contacts"] if c["customer_id"] == row["id"]]
    assert len(result["contacts"]) == len(contacts)
    assert result["contacts"][0]["primary"] is True
    expected_open = {
        t["id"]
        for t in dataset.crm["crm_tickets"]
        if t["customer_id"] == row["id"] and t["status"] in ("open", "pending")
    }
    assert {t["id"] for t in result["open_tickets"]} == expected_open
    interactions = result["recent_interactions"]
    assert len(interactions) == min(
        5, sum(1 for i in dataset.crm["crm_interactions"] if i["customer_id"] == row["id"])
    )
    times = [i["occurred_at"] for i in interactions]
    assert times == sorted(times, reverse=True)
    assert result["customer"]["created_at"].endswith("+00:00")


async def test_find_by_email_ignores_case(crm: SqlCrmStore, dataset: DemoDataset) -> None:
    row = dataset.crm["crm_customers"][7]
    result = await crm.find_by_email(row["email"].upper())
    assert result["customer"]["customer_id"] == row["id"]


async def test_find_by_email_for_a_customer_finds_only_that_customer(
    crm: SqlCrmStore, dataset: DemoDataset
) -> None:
    own, other = dataset.crm["crm_customers"][0], dataset.crm["crm_customers"][1]
    mine = await crm.find_by_email(f"  {own['email'].upper()} ", customer_id=own["id"])
    assert mine["customer"]["customer_id"] == own["id"]
    with pytest.raises(NotFound) as foreign:
        await crm.find_by_email(other["email"], customer_id=own["id"])
    with pytest.raises(NotFound) as unknown:
        await crm.find_by_email("nobody@nowhere.example", customer_id=own["id"])
    assert foreign.value.message == unknown.value.message  # never confirms the e-mail exists


async def test_unknown_customer_is_not_found(crm: SqlCrmStore) -> None:
    with pytest.raises(NotFound):
        await crm.lookup("CUST-9999")
    with pytest.raises(NotFound):
        await crm.find_by_email("nobody@nowhere.example")


async def test_seeding_twice_does_not_duplicate(crm: SqlCrmStore, dataset: DemoDataset) -> None:
    assert await crm.seed(dataset.crm) is False


async def test_unreachable_database_is_unavailable() -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/test"
    engine = create_engine(url)
    store = SqlCrmStore(engine, url=url)
    try:
        with pytest.raises(Unavailable):
            await store.lookup("CUST-0001")
    finally:
        await engine.dispose()
