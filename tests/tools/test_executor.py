"""The executor with fake handlers: concurrency, per-call deadlines, statuses, shaping."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.tools.executor import (
    CallContext,
    CallStatus,
    Invocation,
    ToolExecutor,
    ToolMetrics,
    ToolOutput,
)
from services.tools.output import DEFAULT_MAX_OUTPUT_TOKENS
from services.tools.principal import Principal
from services.tools.registry import Effect, Registry, default_registry, define
from shared.deadlines import Deadline
from shared.errors import FailedPrecondition, NotFound, Unavailable

ANON = Principal.anonymous()
CUST1 = Principal.customer("CUST-0001")


def _executor(
    handlers: dict[str, Any], *, max_tokens: int | None = None
) -> tuple[ToolExecutor, CollectorRegistry]:
    metrics_registry = CollectorRegistry()
    registry = default_registry()

    async def unused(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        raise AssertionError("not called")

    full = {name: handlers.get(name, unused) for name in registry.names()}
    limit = {} if max_tokens is None else {"max_output_tokens": max_tokens}
    return (
        ToolExecutor(registry, full, metrics=ToolMetrics(metrics_registry), **limit),
        metrics_registry,
    )


def _inv(name: str, args: dict[str, Any], call_id: str = "c", **kw: Any) -> Invocation:
    return Invocation(call_id=call_id, name=name, arguments_json=json.dumps(args), **kw)


async def test_batch_runs_concurrently_and_keeps_order() -> None:
    barrier = asyncio.Barrier(3)  # releases only when all three calls are in flight at once

    def gated(source: str) -> Any:
        async def handler(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
            await barrier.wait()
            return ToolOutput({"args": args, "call": ctx.call_id}, source)

        return handler

    executor, _ = _executor(
        {"crm_lookup": gated("crm:f"), "kb_search": gated("kb:f"), "billing_lookup": gated("b:f")}
    )
    results = await executor.execute_many(
        [
            _inv("crm_lookup", {}, "a"),
            _inv("kb_search", {"query": "refund"}, "b"),
            _inv("billing_lookup", {"customer_id": "CUST-0001"}, "c"),
        ],
        CUST1,
    )
    assert [r.call_id for r in results] == ["a", "b", "c"]
    assert all(r.status is CallStatus.OK for r in results)
    assert max(r.started_at for r in results) < min(r.finished_at for r in results)
    assert [r.source for r in results] == ["crm:f", "kb:f", "b:f"]
    crm_args = json.loads(results[0].result_json)["args"]
    assert crm_args == {"customer_id": "CUST-0001"}  # filled from the principal


async def test_one_slow_call_times_out_alone() -> None:
    async def hang(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        await asyncio.Event().wait()
        raise AssertionError

    async def quick(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        return ToolOutput({"ok": True}, "crm:f")

    executor, _ = _executor({"kb_search": hang, "crm_lookup": quick})
    results = await executor.execute_many(
        [
            _inv("kb_search", {"query": "x y"}, "slow", timeout_ms=30),
            _inv("crm_lookup", {}, "fast"),
        ],
        CUST1,
    )
    assert results[0].status is CallStatus.DEADLINE_EXCEEDED
    assert results[1].status is CallStatus.OK


async def test_call_deadline_is_the_earliest_of_tool_invocation_and_rpc() -> None:
    seen: list[float] = []

    async def record(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        seen.append(ctx.deadline.time_remaining())
        return ToolOutput({}, "kb:f")

    executor, _ = _executor({"kb_search": record})
    tool_timeout = default_registry().get("kb_search").timeout_ms / 1000  # type: ignore[union-attr]
    await executor.execute(_inv("kb_search", {"query": "ab"}), ANON)
    await executor.execute(_inv("kb_search", {"query": "ab"}, timeout_ms=500), ANON)
    await executor.execute(
        _inv("kb_search", {"query": "ab"}), ANON, rpc_deadline=Deadline.after(0.2)
    )
    assert tool_timeout - 0.5 < seen[0] <= tool_timeout
    assert seen[1] <= 0.5
    assert seen[2] <= 0.2


async def test_expired_rpc_deadline_fails_fast() -> None:
    executor, _ = _executor({})
    result = await executor.execute(
        _inv("kb_search", {"query": "ab"}), ANON, rpc_deadline=Deadline.after(-1)
    )
    assert result.status is CallStatus.DEADLINE_EXCEEDED


BAD_INPUTS = [
    # (name, arguments_json, idempotency_key, status, field), as CUST-0001
    ("nope", "{}", "", CallStatus.NOT_FOUND, None),
    ("kb_search", "{not json", "", CallStatus.INVALID_ARGUMENT, "arguments_json"),
    ("kb_search", "[1, 2]", "", CallStatus.INVALID_ARGUMENT, "arguments_json"),
    ("kb_search", "{}", "", CallStatus.INVALID_ARGUMENT, "query"),
    ("kb_search", '{"query": "ok", "top_k": 50}', "", CallStatus.INVALID_ARGUMENT, "top_k"),
    ("kb_search", '{"query": "ok", "top_k": "3"}', "", CallStatus.INVALID_ARGUMENT, "top_k"),
    ("kb_search", '{"query": "ok", "color": 1}', "", CallStatus.INVALID_ARGUMENT, "color"),
    ("crm_lookup", '{"email": "a@b.c"}', "", CallStatus.INVALID_ARGUMENT, "email"),
    ("crm_lookup", '{"customer_id": "42"}', "", CallStatus.NOT_FOUND, None),
    ("crm_lookup", "[]", "", CallStatus.INVALID_ARGUMENT, "arguments_json"),
    (
        "billing_refund",
        '{"invoice_id": "INV-00001", "amount": -5, "reason": "dup"}',
        "k1",
        CallStatus.INVALID_ARGUMENT,
        "amount",
    ),
    (
        "billing_refund",
        '{"invoice_id": "INV-00001", "amount": 5, "reason": "duplicate"}',
        "",
        CallStatus.INVALID_ARGUMENT,
        "idempotency_key",
    ),
]


@pytest.mark.parametrize(("name", "args", "key", "status", "field"), BAD_INPUTS)
async def test_bad_input_gets_its_status_and_names_the_field(
    name: str, args: str, key: str, status: CallStatus, field: str | None
) -> None:
    executor, _ = _executor({})
    result = await executor.execute(
        Invocation(call_id="x", name=name, arguments_json=args, idempotency_key=key), CUST1
    )
    assert result.status is status
    if field is not None:
        assert result.error is not None and result.error.metadata["field"] == field
        assert result.error_message.startswith(f"{field}:")
    assert json.loads(result.result_json)["error"] == result.error_message
    assert 'status="' + status.value + '"' in result.fenced_result


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Unavailable("down"), CallStatus.UNAVAILABLE),
        (NotFound("no customer"), CallStatus.NOT_FOUND),
        (FailedPrecondition("too much"), CallStatus.FAILED_PRECONDITION),
    ],
)
async def test_adapter_errors_become_call_statuses(error: Exception, status: CallStatus) -> None:
    async def fail(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        raise error

    async def ok(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        return ToolOutput({"ok": 1}, "kb:f")

    executor, _ = _executor({"crm_lookup": fail, "kb_search": ok})
    results = await executor.execute_many(
        [_inv("crm_lookup", {}), _inv("kb_search", {"query": "ab"})], CUST1
    )
    assert [r.status for r in results] == [status, CallStatus.OK]


async def test_unexpected_exception_is_internal_without_its_text() -> None:
    async def boom(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        raise ValueError("password=hunter2")

    executor, _ = _executor({"crm_lookup": boom})
    result = await executor.execute(_inv("crm_lookup", {}), CUST1)
    assert result.status is CallStatus.INTERNAL
    assert "hunter2" not in result.error_message + result.result_json + result.fenced_result


async def test_large_output_is_truncated_and_counted() -> None:
    async def big(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        return ToolOutput({"rows": [{"i": i, "text": "lorem ipsum " * 5} for i in range(500)]}, "s")

    executor, metrics = _executor({"crm_lookup": big}, max_tokens=300)
    result = await executor.execute(_inv("crm_lookup", {}), CUST1)
    assert result.status is CallStatus.OK and result.truncated
    assert "_truncated" in json.loads(result.result_json)
    assert (
        metrics.get_sample_value("agentmesh_tool_output_truncated_total", {"tool": "crm_lookup"})
        == 1.0
    )
    assert (
        metrics.get_sample_value(
            "agentmesh_tool_calls_total", {"tool": "crm_lookup", "status": "ok"}
        )
        == 1.0
    )


async def test_default_ceiling_is_a_transport_limit() -> None:
    """~5,000 estimated tokens pass untouched: the orchestrator does the model's budget."""

    async def medium(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        return ToolOutput({"rows": [{"i": i, "text": "lorem ipsum " * 5} for i in range(250)]}, "s")

    executor, _ = _executor({"crm_lookup": medium})
    result = await executor.execute(_inv("crm_lookup", {}), CUST1)
    assert DEFAULT_MAX_OUTPUT_TOKENS == 32_000
    assert result.status is CallStatus.OK and not result.truncated
    assert len(json.loads(result.result_json)["rows"]) == 250


async def test_write_calls_carry_effect_key_and_principal() -> None:
    seen: list[tuple[str, dict[str, Any], Principal]] = []

    async def refund(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        seen.append((ctx.idempotency_key, args, ctx.principal))
        return ToolOutput({"refund_id": "RF-1"}, "billing:f", replayed=True)

    executor, _ = _executor({"billing_refund": refund})
    result = await executor.execute(
        _inv(
            "billing_refund",
            {"invoice_id": "INV-00001", "amount": 5, "reason": "duplicate"},
            idempotency_key="key-1",
        ),
        CUST1,
    )
    assert result.status is CallStatus.OK and result.effect is Effect.WRITE and result.replayed
    refund_args = {
        "customer_id": "CUST-0001",
        "invoice_id": "INV-00001",
        "amount": 5,
        "reason": "duplicate",
    }
    assert seen == [("key-1", refund_args, CUST1)]


CUSTOMER_TOOLS = [
    ("crm_lookup", {}, ""),
    ("billing_lookup", {}, ""),
    ("billing_refund", {"invoice_id": "INV-00001", "amount": 5, "reason": "dup"}, "k"),
    ("billing_credit", {"amount": 5, "reason": "outage"}, "k"),
]


@pytest.mark.parametrize(("name", "args", "key"), CUSTOMER_TOOLS)
async def test_anonymous_principal_is_refused_customer_tools(
    name: str, args: dict[str, Any], key: str
) -> None:
    executor, metrics = _executor({})  # every handler raises if reached
    result = await executor.execute(_inv(name, args, idempotency_key=key), ANON)
    assert result.status is CallStatus.PERMISSION_DENIED
    assert result.error_message == "this tool needs a signed-in customer"
    assert 'status="permission_denied"' in result.fenced_result
    assert (
        metrics.get_sample_value(
            "agentmesh_tool_calls_total", {"tool": name, "status": "permission_denied"}
        )
        == 1.0
    )


async def test_anonymous_principal_may_search_the_knowledge_base() -> None:
    async def search(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        return ToolOutput({"principal": ctx.principal.header_value()}, "kb:f")

    executor, _ = _executor({"kb_search": search})
    result = await executor.execute(_inv("kb_search", {"query": "refund"}), ANON)
    assert result.status is CallStatus.OK
    assert json.loads(result.result_json) == {"principal": "anonymous"}


@pytest.mark.parametrize(("name", "args", "key"), CUSTOMER_TOOLS)
async def test_another_customers_id_is_not_found_without_a_leak(
    name: str, args: dict[str, Any], key: str
) -> None:
    executor, _ = _executor({})  # every handler raises if reached
    result = await executor.execute(
        _inv(name, {**args, "customer_id": "CUST-0002"}, idempotency_key=key), CUST1
    )
    assert result.status is CallStatus.NOT_FOUND
    assert result.error_message == "nothing found for that customer_id"
    assert "CUST-0002" not in result.result_json + result.fenced_result


async def test_the_principals_own_id_written_out_is_accepted() -> None:
    async def lookup(args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        return ToolOutput(args, "crm:f")

    executor, _ = _executor({"crm_lookup": lookup})
    result = await executor.execute(_inv("crm_lookup", {"customer_id": "CUST-0001"}), CUST1)
    assert result.status is CallStatus.OK
    assert json.loads(result.result_json) == {"customer_id": "CUST-0001"}


async def test_a_bound_id_is_still_validated_against_the_schema() -> None:
    executor, _ = _executor({})
    result = await executor.execute(_inv("crm_lookup", {}), Principal.customer("acme-7"))
    assert result.status is CallStatus.INVALID_ARGUMENT
    assert result.error is not None and result.error.metadata["field"] == "customer_id"


def test_every_tool_needs_a_handler() -> None:
    tool = define("t", "d", {"type": "object"}, effect=Effect.READ, timeout_ms=1, source_kind="x")
    with pytest.raises(ValueError):
        ToolExecutor(Registry((tool,)), {}, metrics=ToolMetrics(CollectorRegistry()))
