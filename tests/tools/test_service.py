"""The tool service through a real gRPC server on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.tools.v1 import tools_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

from services.tools.adapters.sql import billing_refunds, create_engine
from services.tools.backends import Backends, open_backends
from services.tools.demo_data import DemoDataset
from services.tools.output import estimate_tokens
from services.tools.registry import default_registry
from services.tools.service import SERVICE_NAME, ToolsService
from shared.server import GrpcServer
from tests.tools.conftest import as_customer, bad_request_fields, serving_stub, tools_settings
from tests.tools.fakes import GatedBilling, GatedCrm, GatedKb, HashEmbedder

S = tools_pb2  # brevity in tables
CUST1 = as_customer("CUST-0001")


def _inv(name: str, args: Any, call_id: str = "c1", **kw: Any) -> tools_pb2.ToolInvocation:
    raw = args if isinstance(args, str) else json.dumps(args)
    return tools_pb2.ToolInvocation(call_id=call_id, name=name, arguments_json=raw, **kw)


async def test_health_and_registry(stores_server: GrpcServer, stub: Any) -> None:
    async with grpc.aio.insecure_channel(stores_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    listed = await stub.ListTools(tools_pb2.ListToolsRequest(), timeout=5)
    again = await stub.ListTools(tools_pb2.ListToolsRequest(), timeout=5)
    assert listed == again
    assert listed.registry_version == default_registry().version
    assert [t.name for t in listed.tools] == sorted(t.name for t in listed.tools)
    effects = {t.name: t.effect for t in listed.tools}
    assert effects["billing_refund"] == common_pb2.TOOL_EFFECT_WRITE
    assert effects["kb_search"] == common_pb2.TOOL_EFFECT_READ
    for tool in listed.tools:
        assert json.loads(tool.parameters_json_schema)["type"] == "object"
        assert tool.timeout_ms > 0
    bound = {t.name: (list(t.principal_arguments), t.requires_customer) for t in listed.tools}
    assert bound == {
        "billing_credit": (["customer_id"], True),
        "billing_lookup": (["customer_id"], True),
        "billing_refund": (["customer_id"], True),
        "crm_lookup": (["customer_id"], True),
        "kb_search": ([], False),
    }


async def test_three_tools_in_one_batch_return_real_data(stub: Any) -> None:
    reply = await stub.ExecuteTools(
        tools_pb2.ExecuteToolsRequest(
            invocations=[
                _inv("crm_lookup", {}, "crm"),
                _inv("kb_search", {"query": "charged twice refund"}, "kb"),
                _inv("billing_lookup", {}, "bill"),
            ]
        ),
        timeout=30,
        metadata=CUST1,
    )
    assert [r.call_id for r in reply.results] == ["crm", "kb", "bill"]
    assert all(r.status == S.TOOL_RESULT_STATUS_OK for r in reply.results)
    crm, kb, bill = reply.results
    assert json.loads(crm.result_json)["customer"]["customer_id"] == "CUST-0001"
    assert json.loads(kb.result_json)["results"]
    assert json.loads(bill.result_json)["invoices"][0]["double_charged"] is True
    assert [r.source for r in reply.results] == ["crm:sqlite", "kb:local", "billing:sqlite"]
    for r in reply.results:
        assert r.fenced_result.startswith(f'<tool_result tool="{r.name}" call_id="{r.call_id}"')
        assert f'source="{r.source}"' in r.fenced_result
        assert r.effect == common_pb2.TOOL_EFFECT_READ
        assert r.latency.ToNanoseconds() > 0
        assert r.finished_at.ToNanoseconds() >= r.started_at.ToNanoseconds()


async def test_batch_calls_overlap(tmp_path: Path) -> None:
    """Each fake adapter waits at a 3-party barrier: the batch only completes if they overlap."""
    barrier = asyncio.Barrier(3)
    backends = Backends(crm=GatedCrm(barrier), kb=GatedKb(barrier), billing=GatedBilling(barrier))
    settings = tools_settings(tmp_path)
    async with serving_stub(ToolsService(settings, backends=backends)) as stub:
        reply = await stub.ExecuteTools(
            tools_pb2.ExecuteToolsRequest(
                invocations=[
                    _inv("crm_lookup", {}, "a"),
                    _inv("kb_search", {"query": "refund"}, "b"),
                    _inv("billing_lookup", {}, "c"),
                ]
            ),
            timeout=30,
            metadata=CUST1,
        )
    assert all(r.status == S.TOOL_RESULT_STATUS_OK for r in reply.results)
    starts = [r.started_at.ToNanoseconds() for r in reply.results]
    ends = [r.finished_at.ToNanoseconds() for r in reply.results]
    assert max(starts) < min(ends)


async def test_one_failure_never_fails_the_batch(tmp_path: Path) -> None:
    barrier = asyncio.Barrier(1)
    backends = Backends(
        crm=GatedCrm(barrier),
        kb=GatedKb(barrier, hang=True),
        billing=GatedBilling(barrier, down=True),
    )
    async with serving_stub(ToolsService(tools_settings(tmp_path), backends=backends)) as stub:
        reply = await stub.ExecuteTools(
            tools_pb2.ExecuteToolsRequest(
                invocations=[
                    _inv("crm_lookup", {}, "ok"),
                    _inv("kb_search", {"query": "refund"}, "slow", timeout_ms=100),
                    _inv("billing_lookup", {}, "down"),
                    _inv("no_such_tool", {}, "unknown"),
                ]
            ),
            timeout=30,
            metadata=CUST1,
        )
        assert [r.status for r in reply.results] == [
            S.TOOL_RESULT_STATUS_OK,
            S.TOOL_RESULT_STATUS_DEADLINE_EXCEEDED,
            S.TOOL_RESULT_STATUS_UNAVAILABLE,
            S.TOOL_RESULT_STATUS_NOT_FOUND,
        ]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExecuteTool(
                tools_pb2.ExecuteToolRequest(invocation=_inv("billing_lookup", {})),
                timeout=30,
                metadata=CUST1,
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_real_billing_api_down_is_unavailable_for_that_call_only(
    tmp_path: Path, dataset: DemoDataset
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = tools_settings(
        tmp_path, billing_backend="http", billing_api_url=f"http://127.0.0.1:{port}"
    )
    backends = await open_backends(settings, embedder=HashEmbedder(), dataset=dataset)
    try:
        async with serving_stub(ToolsService(settings, backends=backends)) as stub:
            reply = await stub.ExecuteTools(
                tools_pb2.ExecuteToolsRequest(
                    invocations=[
                        _inv("crm_lookup", {}, "crm"),
                        _inv("kb_search", {"query": "payment failed"}, "kb"),
                        _inv("billing_lookup", {}, "bill"),
                    ]
                ),
                timeout=30,
                metadata=as_customer("CUST-0002"),
            )
    finally:
        await backends.close()
    statuses = [r.status for r in reply.results]
    assert statuses == [
        S.TOOL_RESULT_STATUS_OK,
        S.TOOL_RESULT_STATUS_OK,
        S.TOOL_RESULT_STATUS_UNAVAILABLE,
    ]
    assert reply.results[2].source == "billing:http"
    assert "unreachable" in reply.results[2].error_message


BAD = [
    # (invocation, RPC/result status, field named in BadRequest or None); all as CUST-0001
    (_inv("unknown_tool", {}), grpc.StatusCode.NOT_FOUND, None),
    (_inv("kb_search", "{oops"), grpc.StatusCode.INVALID_ARGUMENT, "arguments_json"),
    (_inv("kb_search", {"top_k": 3}), grpc.StatusCode.INVALID_ARGUMENT, "query"),
    (_inv("kb_search", {"query": "x" * 600}), grpc.StatusCode.INVALID_ARGUMENT, "query"),
    (_inv("crm_lookup", {"name": "Chloe"}), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    (_inv("crm_lookup", {"customer_id": "CUST-9999"}), grpc.StatusCode.NOT_FOUND, None),
    (_inv("billing_lookup", {"invoice_id": "INV-99999"}), grpc.StatusCode.NOT_FOUND, None),
    (
        _inv("billing_lookup", {"limit": 0}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit",
    ),
    (
        _inv("billing_refund", {"invoice_id": "INV-00001", "amount": 1, "reason": "dup"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "idempotency_key",
    ),
    (
        _inv(
            "billing_refund",
            {"invoice_id": "INV-00001", "amount": 1.234, "reason": "dup"},
            idempotency_key="k",
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "amount",
    ),
    (
        _inv(
            "billing_refund",
            {"invoice_id": "INV-00001", "amount": 99999, "reason": "too much"},
            idempotency_key="bad-too-much",
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        None,
    ),
]
_RESULT_STATUS = {
    grpc.StatusCode.NOT_FOUND: S.TOOL_RESULT_STATUS_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: S.TOOL_RESULT_STATUS_INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION: S.TOOL_RESULT_STATUS_FAILED_PRECONDITION,
}


@pytest.mark.parametrize(("invocation", "code", "field"), BAD)
async def test_bad_input_single_call_is_the_rpc_status(
    stub: Any, invocation: tools_pb2.ToolInvocation, code: grpc.StatusCode, field: str | None
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTool(
            tools_pb2.ExecuteToolRequest(invocation=invocation), timeout=10, metadata=CUST1
        )
    assert caught.value.code() == code
    assert bad_request_fields(caught.value) == ([] if field is None else [field])


async def test_bad_input_in_a_batch_is_a_per_call_status(stub: Any) -> None:
    invocations = [inv for inv, _, _ in BAD]
    for i, inv in enumerate(invocations):
        inv.call_id = f"bad-{i}"
    good = _inv("crm_lookup", {}, "good")
    reply = await stub.ExecuteTools(
        tools_pb2.ExecuteToolsRequest(invocations=[*invocations, good]),
        timeout=30,
        metadata=CUST1,
    )
    assert [r.status for r in reply.results] == [
        *(_RESULT_STATUS[code] for _, code, _ in BAD),
        S.TOOL_RESULT_STATUS_OK,
    ]
    for result, (_, _, field) in zip(reply.results, BAD, strict=False):
        if field is not None:
            assert result.error_message.startswith(f"{field}:")


async def test_refund_is_exactly_once_under_retry_and_concurrent_duplicates(
    stub: Any, stores_server: GrpcServer, dataset: DemoDataset
) -> None:
    invoice = next(
        i for i in dataset.billing["billing_invoices"] if i["customer_id"] == "CUST-0005"
    )
    args = {"invoice_id": invoice["id"], "amount": 5.5, "reason": "goodwill gesture"}
    cust5 = as_customer("CUST-0005")

    def call(key: str) -> Any:
        return stub.ExecuteTool(
            tools_pb2.ExecuteToolRequest(
                invocation=_inv("billing_refund", args, idempotency_key=key)
            ),
            timeout=30,
            metadata=cust5,
        )

    first = (await call("svc-retry")).result
    retried = (await call("svc-retry")).result
    assert first.effect == common_pb2.TOOL_EFFECT_WRITE
    assert not first.replayed and retried.replayed
    assert retried.result_json == first.result_json
    assert json.loads(first.result_json)["amount"] == 5.5
    assert json.loads(first.result_json)["customer_id"] == "CUST-0005"

    replies = await asyncio.gather(*(call("svc-concurrent") for _ in range(6)))
    batch = await stub.ExecuteTools(
        tools_pb2.ExecuteToolsRequest(
            invocations=[
                _inv("billing_refund", args, f"d{i}", idempotency_key="svc-concurrent")
                for i in range(3)
            ]
        ),
        timeout=30,
        metadata=cust5,
    )
    results = [r.result for r in replies] + list(batch.results)
    assert all(r.status == S.TOOL_RESULT_STATUS_OK for r in results)
    assert sum(1 for r in results if not r.replayed) == 1
    assert len({json.loads(r.result_json)["refund_id"] for r in results}) == 1

    settings = stores_server.service.settings  # type: ignore[attr-defined]
    engine = create_engine(settings.resolved_billing_url())
    try:
        async with engine.connect() as conn:
            count = (
                await conn.execute(
                    select(func.count()).where(billing_refunds.c.invoice_id == invoice["id"])
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    assert count == 2  # one per distinct key, never one per call

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # same key, other arguments
        await stub.ExecuteTool(
            tools_pb2.ExecuteToolRequest(
                invocation=_inv(
                    "billing_refund", {**args, "amount": 6}, idempotency_key="svc-retry"
                )
            ),
            timeout=30,
            metadata=cust5,
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_long_output_is_truncated_and_counted(tmp_path: Path, dataset: DemoDataset) -> None:
    settings = tools_settings(tmp_path, max_output_tokens=120)
    backends = await open_backends(settings, embedder=HashEmbedder(), dataset=dataset)
    service = ToolsService(settings, backends=backends)
    try:
        async with serving_stub(service) as stub:
            reply = await stub.ExecuteTool(
                tools_pb2.ExecuteToolRequest(invocation=_inv("billing_lookup", {"limit": 6})),
                timeout=30,
                metadata=CUST1,
            )
    finally:
        await backends.close()
    result = reply.result
    assert result.truncated
    assert "_truncated" in json.loads(result.result_json)
    assert "output cut to fit 120 tokens" in result.fenced_result
    value = service.metrics_registry.get_sample_value(
        "agentmesh_tool_output_truncated_total", {"tool": "billing_lookup"}
    )
    assert value == 1.0


async def test_default_ceiling_leaves_a_full_lookup_whole(stub: Any, dataset: DemoDataset) -> None:
    """The tools service only cuts at its transport ceiling; the orchestrator budgets tokens."""
    reply = await stub.ExecuteTool(
        tools_pb2.ExecuteToolRequest(invocation=_inv("billing_lookup", {"limit": 24})),
        timeout=30,
        metadata=CUST1,
    )
    assert not reply.result.truncated
    assert estimate_tokens(reply.result.result_json) > 1000  # the old cut would have hit it
    invoices = [i for i in dataset.billing["billing_invoices"] if i["customer_id"] == "CUST-0001"]
    assert len(json.loads(reply.result.result_json)["invoices"]) == len(invoices)


async def test_too_large_batch_is_refused(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTools(
            tools_pb2.ExecuteToolsRequest(
                invocations=[_inv("kb_search", {"query": "ab"}, str(i)) for i in range(40)]
            ),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["invocations"]


async def test_batch_bound_is_the_configured_limit(tmp_path: Path) -> None:
    """`limits.max_batch` is the one bound: a batch above the default 32 runs when allowed."""
    backends = Backends(
        crm=GatedCrm(asyncio.Barrier(1)),
        kb=GatedKb(asyncio.Barrier(1)),
        billing=GatedBilling(asyncio.Barrier(1)),
    )
    settings = tools_settings(tmp_path, limits={"max_batch": 40})
    batch = [_inv("kb_search", {"query": "ab"}, str(i)) for i in range(41)]
    async with serving_stub(ToolsService(settings, backends=backends)) as stub:
        reply = await stub.ExecuteTools(
            tools_pb2.ExecuteToolsRequest(invocations=batch[:40]), timeout=30
        )
        assert [r.status for r in reply.results] == [S.TOOL_RESULT_STATUS_OK] * 40
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExecuteTools(tools_pb2.ExecuteToolsRequest(invocations=batch), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["invocations"]
