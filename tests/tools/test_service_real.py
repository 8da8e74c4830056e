"""The production path: warm-up opens the embedded stores, seeds them and loads MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from sqlalchemy import func, select

from services.tools.adapters.kb import MiniLmEmbedder
from services.tools.adapters.sql import create_engine, crm_customers
from services.tools.service import ToolsService
from tests.tools.conftest import as_customer, running_server, tools_settings

pytestmark = pytest.mark.slow


async def test_warm_up_seeds_and_three_real_calls_overlap(
    tmp_path: Path, minilm: MiniLmEmbedder
) -> None:
    settings = tools_settings(tmp_path)
    async with running_server(ToolsService(settings, embedder=minilm)) as server:
        assert (tmp_path / "tools.sqlite").exists()
        assert (tmp_path / "kb" / "local" / "manifest.json").exists()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = tools_pb2_grpc.ToolServiceStub(channel)
            reply = await stub.ExecuteTools(
                tools_pb2.ExecuteToolsRequest(
                    invocations=[
                        tools_pb2.ToolInvocation(
                            call_id="crm",
                            name="crm_lookup",
                            arguments_json="{}",
                        ),
                        tools_pb2.ToolInvocation(
                            call_id="kb",
                            name="kb_search",
                            arguments_json=json.dumps({"query": "I was charged twice"}),
                        ),
                        tools_pb2.ToolInvocation(
                            call_id="bill",
                            name="billing_lookup",
                            arguments_json="{}",
                        ),
                    ]
                ),
                timeout=60,
                metadata=as_customer("CUST-0200"),
            )
    assert all(r.status == tools_pb2.TOOL_RESULT_STATUS_OK for r in reply.results)
    crm, kb, bill = (json.loads(r.result_json) for r in reply.results)
    assert crm["customer"]["customer_id"] == "CUST-0200"  # the full 200-customer data set
    assert kb["results"][0]["article_id"] == "KB-1002"
    assert bill["customer_id"] == "CUST-0200" and bill["invoices"]
    starts = [r.started_at.ToNanoseconds() for r in reply.results]
    ends = [r.finished_at.ToNanoseconds() for r in reply.results]
    assert max(starts) < min(ends)

    # A restart finds the stores populated: nothing is seeded or embedded twice.
    manifest = tmp_path / "kb" / "local" / "manifest.json"
    built_at = manifest.stat().st_mtime_ns
    settings_again = tools_settings(tmp_path)
    async with running_server(ToolsService(settings_again, embedder=minilm)):
        pass
    assert manifest.stat().st_mtime_ns == built_at
    engine = create_engine(settings_again.resolved_crm_url())
    try:
        async with engine.connect() as conn:
            customers = (
                await conn.execute(select(func.count()).select_from(crm_customers))
            ).scalar_one()
    finally:
        await engine.dispose()
    assert customers == 200
