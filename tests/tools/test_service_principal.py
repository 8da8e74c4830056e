"""Principal-scoped tools through a real gRPC server: who may call what, and nothing leaks.

The principal travels as ``agentmesh-principal`` metadata; the arguments are what a model
(or a direct grpcurl caller, or a compromised orchestrator) wrote.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from google.protobuf import text_format
from grpc_status import rpc_status
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.tools.adapters.sql import billing_credits, billing_invoices, billing_refunds
from services.tools.backends import open_backends
from services.tools.demo_data import DemoDataset
from services.tools.principal import PRINCIPAL_HEADER
from services.tools.registry import default_registry
from services.tools.service import ToolsService
from tests.tools.conftest import (
    Database,
    Metadata,
    as_customer,
    bad_request_fields,
    principal_md,
    serving_stub,
    tools_settings,
)
from tests.tools.fakes import HashEmbedder

S = tools_pb2
CUST1 = as_customer("CUST-0001")
ANONYMOUS_CALLERS = [
    pytest.param((), id="no-header"),
    pytest.param(principal_md("anonymous"), id="anonymous"),
]
CUSTOMER_TOOLS = ["crm_lookup", "billing_lookup", "billing_refund", "billing_credit"]


def _inv(name: str, args: dict[str, Any], call_id: str = "c1", **kw: Any) -> S.ToolInvocation:
    return S.ToolInvocation(call_id=call_id, name=name, arguments_json=json.dumps(args), **kw)


def _customer(dataset: DemoDataset, customer_id: str) -> dict[str, Any]:
    return next(c for c in dataset.crm["crm_customers"] if c["id"] == customer_id)


def _invoices(dataset: DemoDataset, customer_id: str) -> list[dict[str, Any]]:
    return [i for i in dataset.billing["billing_invoices"] if i["customer_id"] == customer_id]


def _traces_of(dataset: DemoDataset, customer_id: str) -> list[str]:
    """Strings only that customer's records hold: none may appear in another's response."""
    row = _customer(dataset, customer_id)
    return [
        customer_id,
        row["email"],
        row["name"],
        row["phone"],
        *(i["id"] for i in _invoices(dataset, customer_id)),
    ]


def _leaked(message: Any, dataset: DemoDataset, customer_id: str) -> list[str]:
    rendered = text_format.MessageToString(message, as_utf8=True)
    return [trace for trace in _traces_of(dataset, customer_id) if trace in rendered]


def _error_leaked(error: grpc.aio.AioRpcError, dataset: DemoDataset, customer_id: str) -> list[str]:
    status = rpc_status.from_call(error)
    rendered = (error.details() or "") + (text_format.MessageToString(status) if status else "")
    return [trace for trace in _traces_of(dataset, customer_id) if trace in rendered]


async def _count(engine: AsyncEngine, query: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


# --- anonymous ------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", ANONYMOUS_CALLERS)
async def test_anonymous_may_search_the_kb_and_nothing_else(
    stub: tools_pb2_grpc.ToolServiceStub, metadata: Metadata
) -> None:
    reply = await stub.ExecuteTools(
        S.ExecuteToolsRequest(
            invocations=[
                _inv("crm_lookup", {}, "crm"),
                _inv("crm_lookup", {"customer_id": "CUST-0001"}, "crm-named"),
                _inv("billing_lookup", {"customer_id": "CUST-0001"}, "bill"),
                _inv(
                    "billing_refund",
                    {
                        "customer_id": "CUST-0001",
                        "invoice_id": "INV-00002",
                        "amount": 1,
                        "reason": "x" * 3,
                    },
                    "refund",
                    idempotency_key="anon-refund",
                ),
                _inv(
                    "billing_credit",
                    {"customer_id": "CUST-0001", "amount": 1, "reason": "outage"},
                    "credit",
                    idempotency_key="anon-credit",
                ),
                _inv("kb_search", {"query": "charged twice"}, "kb"),
            ]
        ),
        timeout=30,
        metadata=metadata,
    )
    denied, kb = reply.results[:-1], reply.results[-1]
    assert [r.status for r in denied] == [S.TOOL_RESULT_STATUS_PERMISSION_DENIED] * 5
    for result in denied:
        assert result.error_message == "this tool needs a signed-in customer"
        assert 'status="permission_denied"' in result.fenced_result
        assert "CUST-0001" not in result.result_json
    assert kb.status == S.TOOL_RESULT_STATUS_OK
    assert json.loads(kb.result_json)["results"]


@pytest.mark.parametrize("metadata", ANONYMOUS_CALLERS)
@pytest.mark.parametrize("name", CUSTOMER_TOOLS)
async def test_single_call_permission_denied_is_the_rpc_status(
    stub: tools_pb2_grpc.ToolServiceStub, metadata: Metadata, name: str
) -> None:
    args = {"invoice_id": "INV-00002", "amount": 1, "reason": "anon"}
    args = {k: v for k, v in args.items() if name == "billing_refund" or k != "invoice_id"}
    key = "anon-single" if name in ("billing_refund", "billing_credit") else ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTool(
            S.ExecuteToolRequest(invocation=_inv(name, args, idempotency_key=key)),
            timeout=10,
            metadata=metadata,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "this tool needs a signed-in customer"


# --- a bound customer -----------------------------------------------------------------
async def test_crm_lookup_reads_the_principals_own_record_only(
    stub: tools_pb2_grpc.ToolServiceStub, dataset: DemoDataset
) -> None:
    reply = await stub.ExecuteTools(
        S.ExecuteToolsRequest(
            invocations=[
                _inv("crm_lookup", {}, "own"),
                _inv("crm_lookup", {"customer_id": "CUST-0001"}, "own-named"),
                _inv("crm_lookup", {"customer_id": "CUST-0002"}, "other"),
                _inv("crm_lookup", {"customer_id": "CUST-9999"}, "nobody"),
            ]
        ),
        timeout=30,
        metadata=CUST1,
    )
    own, named, other, nobody = reply.results
    assert own.status == named.status == S.TOOL_RESULT_STATUS_OK
    profile = json.loads(own.result_json)
    assert profile["customer"]["customer_id"] == "CUST-0001"
    assert profile["customer"]["email"] == _customer(dataset, "CUST-0001")["email"]
    assert json.loads(named.result_json) == profile
    assert other.status == nobody.status == S.TOOL_RESULT_STATUS_NOT_FOUND
    assert other.error_message == nobody.error_message  # whether or not it exists
    assert _leaked(other, dataset, "CUST-0002") == []

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTool(
            S.ExecuteToolRequest(invocation=_inv("crm_lookup", {"customer_id": "CUST-0002"})),
            timeout=10,
            metadata=CUST1,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert _error_leaked(caught.value, dataset, "CUST-0002") == []


async def test_billing_lookup_of_another_customer_is_not_found(
    stub: tools_pb2_grpc.ToolServiceStub, dataset: DemoDataset
) -> None:
    foreign_invoice = _invoices(dataset, "CUST-0002")[0]["id"]
    reply = await stub.ExecuteTools(
        S.ExecuteToolsRequest(
            invocations=[
                _inv("billing_lookup", {}, "own"),
                _inv("billing_lookup", {"invoice_id": foreign_invoice}, "foreign-invoice"),
                _inv("billing_lookup", {"invoice_id": "INV-99999"}, "no-invoice"),
                _inv("billing_lookup", {"customer_id": "CUST-0002"}, "foreign-customer"),
            ]
        ),
        timeout=30,
        metadata=CUST1,
    )
    own, foreign, missing, other_customer = reply.results
    assert own.status == S.TOOL_RESULT_STATUS_OK
    overview = json.loads(own.result_json)
    assert overview["customer_id"] == "CUST-0001"
    assert overview["invoices"][0]["double_charged"] is True  # the README's showcase
    assert [r.status for r in (foreign, missing, other_customer)] == [
        S.TOOL_RESULT_STATUS_NOT_FOUND
    ] * 3
    assert foreign.error_message == missing.error_message
    for result in (foreign, other_customer):
        assert _leaked(result, dataset, "CUST-0002") == []


@pytest.fixture
async def db_stub(
    database: Database, dataset: DemoDataset, tmp_path: Path
) -> AsyncIterator[tools_pb2_grpc.ToolServiceStub]:
    """A server whose CRM and billing live in `database` (SQLite, and PostgreSQL)."""
    settings = tools_settings(
        tmp_path,
        crm_database_url=database.url,
        billing_database_url=database.url,
        database_schema=database.schema,
    )
    backends = await open_backends(settings, embedder=HashEmbedder(), dataset=dataset)
    try:
        async with serving_stub(ToolsService(settings, backends=backends)) as stub:
            yield stub
    finally:
        await backends.close()


async def test_refunds_and_credits_touch_only_the_principals_money(
    db_stub: tools_pb2_grpc.ToolServiceStub, database: Database, dataset: DemoDataset
) -> None:
    foreign = _invoices(dataset, "CUST-0002")[0]
    own = _invoices(dataset, "CUST-0001")[-1]  # the latest: charged twice
    refund = {"amount": 10, "reason": "duplicate charge"}
    reply = await db_stub.ExecuteTools(
        S.ExecuteToolsRequest(
            invocations=[
                _inv(
                    "billing_refund",
                    {"invoice_id": foreign["id"], **refund},
                    "foreign",
                    idempotency_key="p-1",
                ),
                _inv(
                    "billing_refund",
                    {"customer_id": "CUST-0002", "invoice_id": foreign["id"], **refund},
                    "foreign-named",
                    idempotency_key="p-2",
                ),
                _inv(
                    "billing_refund",
                    {"invoice_id": "INV-99999", **refund},
                    "missing",
                    idempotency_key="p-3",
                ),
                _inv(
                    "billing_credit",
                    {"customer_id": "CUST-0002", "amount": 5, "reason": "outage"},
                    "foreign-credit",
                    idempotency_key="p-4",
                ),
            ]
        ),
        timeout=30,
        metadata=CUST1,
    )
    assert [r.status for r in reply.results] == [S.TOOL_RESULT_STATUS_NOT_FOUND] * 4
    by_call = {r.call_id: r for r in reply.results}
    assert by_call["foreign"].error_message == by_call["missing"].error_message
    for result in reply.results:
        assert _leaked(result, dataset, "CUST-0002") == []
    # no money moved
    engine = database.engine
    assert await _count(engine, select(func.count()).select_from(billing_refunds)) == 0
    assert await _count(engine, select(func.count()).select_from(billing_credits)) == 0
    refunded = select(billing_invoices.c.refunded_cents).where(
        billing_invoices.c.id == foreign["id"]
    )
    assert await _count(engine, refunded) == 0

    # the principal's own invoice: customer_id filled in by the service
    mine = await db_stub.ExecuteTool(
        S.ExecuteToolRequest(
            invocation=_inv(
                "billing_refund",
                {"invoice_id": own["id"], "amount": own["amount_cents"] / 100, "reason": "dup"},
                idempotency_key="p-own",
            )
        ),
        timeout=30,
        metadata=CUST1,
    )
    outcome = json.loads(mine.result.result_json)
    assert mine.result.status == S.TOOL_RESULT_STATUS_OK
    assert outcome["customer_id"] == "CUST-0001" and outcome["invoice_id"] == own["id"]
    assert outcome["invoice_status"] == "paid"  # the duplicate charge went back
    own_rows = select(func.count()).where(billing_refunds.c.invoice_id == own["id"])
    assert await _count(engine, own_rows) == 1
    assert await _count(engine, select(func.count()).select_from(billing_refunds)) == 1


# --- the header itself ----------------------------------------------------------------
MALFORMED = [
    principal_md(""),
    principal_md("customer:"),
    principal_md("customer:CUST 0001"),
    principal_md("Customer:CUST-0001"),
    principal_md("admin"),
    (*principal_md("customer:CUST-0001"), *principal_md("customer:CUST-0002")),
]


@pytest.mark.parametrize("metadata", MALFORMED)
async def test_malformed_principal_is_invalid_argument_naming_the_header(
    stub: tools_pb2_grpc.ToolServiceStub, metadata: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as single:
        await stub.ExecuteTool(
            S.ExecuteToolRequest(invocation=_inv("kb_search", {"query": "refund"})),
            timeout=10,
            metadata=metadata,
        )
    with pytest.raises(grpc.aio.AioRpcError) as batch:
        await stub.ExecuteTools(
            S.ExecuteToolsRequest(invocations=[_inv("kb_search", {"query": "refund"})]),
            timeout=10,
            metadata=metadata,
        )
    for caught in (single, batch):
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(caught.value) == [PRINCIPAL_HEADER]
        assert (caught.value.details() or "").startswith(f"{PRINCIPAL_HEADER}:")


# --- e-mail lookup --------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [(), CUST1])
async def test_email_lookup_is_absent_by_default(
    stub: tools_pb2_grpc.ToolServiceStub, dataset: DemoDataset, metadata: Metadata
) -> None:
    listed = await stub.ListTools(S.ListToolsRequest(), timeout=5)
    assert "crm_find_customer" not in [t.name for t in listed.tools]
    email = _customer(dataset, "CUST-0001")["email"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTool(
            S.ExecuteToolRequest(invocation=_inv("crm_find_customer", {"email": email})),
            timeout=10,
            metadata=metadata,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no tool named" in (caught.value.details() or "")


@pytest.fixture(scope="module")
async def email_stub(
    tmp_path_factory: pytest.TempPathFactory, dataset: DemoDataset
) -> AsyncIterator[tools_pb2_grpc.ToolServiceStub]:
    settings = tools_settings(tmp_path_factory.mktemp("email"), allow_email_lookup=True)
    backends = await open_backends(settings, embedder=HashEmbedder(), dataset=dataset)
    try:
        async with serving_stub(ToolsService(settings, backends=backends)) as stub:
            yield stub
    finally:
        await backends.close()


async def test_email_lookup_when_allowed_is_listed(
    email_stub: tools_pb2_grpc.ToolServiceStub,
) -> None:
    listed = await email_stub.ListTools(S.ListToolsRequest(), timeout=5)
    find = next(t for t in listed.tools if t.name == "crm_find_customer")
    assert list(find.principal_arguments) == [] and find.requires_customer is False
    assert json.loads(find.parameters_json_schema)["required"] == ["email"]
    assert listed.registry_version == default_registry(allow_email_lookup=True).version
    assert listed.registry_version != default_registry().version


@pytest.mark.parametrize("metadata", ANONYMOUS_CALLERS)
async def test_email_lookup_for_anonymous_finds_that_customer(
    email_stub: tools_pb2_grpc.ToolServiceStub, dataset: DemoDataset, metadata: Metadata
) -> None:
    row = _customer(dataset, "CUST-0002")
    reply = await email_stub.ExecuteTool(
        S.ExecuteToolRequest(invocation=_inv("crm_find_customer", {"email": row["email"]})),
        timeout=10,
        metadata=metadata,
    )
    assert reply.result.status == S.TOOL_RESULT_STATUS_OK
    assert json.loads(reply.result.result_json)["customer"]["customer_id"] == "CUST-0002"


async def test_email_lookup_for_a_bound_customer_finds_only_itself(
    email_stub: tools_pb2_grpc.ToolServiceStub, dataset: DemoDataset
) -> None:
    own, other = _customer(dataset, "CUST-0001"), _customer(dataset, "CUST-0002")
    reply = await email_stub.ExecuteTools(
        S.ExecuteToolsRequest(
            invocations=[
                _inv("crm_find_customer", {"email": own["email"].upper()}, "own"),
                _inv("crm_find_customer", {"email": other["email"]}, "other"),
                _inv("crm_find_customer", {"email": "nobody@nowhere.example"}, "nobody"),
            ]
        ),
        timeout=30,
        metadata=CUST1,
    )
    mine, foreign, nobody = reply.results
    assert mine.status == S.TOOL_RESULT_STATUS_OK
    assert json.loads(mine.result_json)["customer"]["customer_id"] == "CUST-0001"
    assert foreign.status == nobody.status == S.TOOL_RESULT_STATUS_NOT_FOUND
    assert foreign.error_message == nobody.error_message
    assert _leaked(foreign, dataset, "CUST-0002") == []
