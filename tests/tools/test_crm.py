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
    result = await crm.lookup(customer_id=row["id"])
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


async def test_lookup_by_email_ignores_case(crm: SqlCrmStore, dataset: DemoDataset) -> None:
    row = dataset.crm["crm_customers"][7]
    result = await crm.lookup(email=row["email"].upper())
    assert result["customer"]["customer_id"] == row["id"]


async def test_lookup_by_name(crm: SqlCrmStore, dataset: DemoDataset) -> None:
    customers = dataset.crm["crm_customers"]
    names = [c["name"] for c in customers]
    unique = next(c for c in customers if names.count(c["name"]) == 1)
    result = await crm.lookup(name=unique["name"].lower())
    assert result["customer"]["customer_id"] == unique["id"]
    # a fragment shared by several customers returns candidates, not a guess
    last = unique["name"].split()[1]
    sharing = [c for c in customers if last.lower() in c["name"].lower()]
    partial = await crm.lookup(name=last)
    if len(sharing) > 1:
        assert {m["customer_id"] for m in partial["matches"]} <= {c["id"] for c in sharing}
        assert "ask which one" in partial["note"]
    else:
        assert partial["customer"]["customer_id"] == unique["id"]


async def test_name_matching_several_lists_candidates(
    crm: SqlCrmStore, dataset: DemoDataset
) -> None:
    # every demo email domain ends in ".example"; a one-letter-ish name fragment matches many
    result = await crm.lookup(name="an")
    expected = [c for c in dataset.crm["crm_customers"] if "an" in c["name"].lower()]
    assert len(expected) > 5
    assert len(result["matches"]) == 5 and result["more_matches"] is True


@pytest.mark.parametrize(
    "key", [{"customer_id": "CUST-9999"}, {"email": "nobody@nowhere.example"}, {"name": "Zzyzx"}]
)
async def test_unknown_customer_is_not_found(crm: SqlCrmStore, key: dict[str, str]) -> None:
    with pytest.raises(NotFound):
        await crm.lookup(**key)


async def test_seeding_twice_does_not_duplicate(crm: SqlCrmStore, dataset: DemoDataset) -> None:
    assert await crm.seed(dataset.crm) is False


async def test_unreachable_database_is_unavailable() -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/test"
    engine = create_engine(url)
    store = SqlCrmStore(engine, url=url)
    try:
        with pytest.raises(Unavailable):
            await store.lookup(customer_id="CUST-0001")
    finally:
        await engine.dispose()
