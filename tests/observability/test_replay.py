"""Replay on the in-process fakes: recorded tool results are fed back (no live tools), the
calls the replayed turn makes are scored, the F1 lands in a textfile-collector file; turn
records are written redacted."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.orchestrator.loop.policy import AgentProfile, Caps
from services.orchestrator.loop.runner import TurnRunner
from services.orchestrator.loop.state import TurnInput
from services.orchestrator.loop.types import EmittedCall, Principal, ToolCall, ToolInvocation
from services.orchestrator.replay.export import report_registry, write_textfile
from services.orchestrator.replay.recorder import TurnRecorder
from services.orchestrator.replay.records import (
    ExpectedCall,
    RecordedCall,
    TurnRecord,
    read_records,
    unfence,
    write_records,
)
from services.orchestrator.replay.runner import replay
from services.orchestrator.replay.tools import RecordedTools
from tests.orchestrator.fakes import REGISTRY, FakeInference, FakeTools, planned

GOLD = Path(__file__).resolve().parents[1] / "data" / "gold_turns.jsonl"
PROFILE = AgentProfile(compose_reserve_s=0.2)
CAPS = Caps(turn_budget_s=60, task_budget_s=600)


def _record(**kw: object) -> TurnRecord:
    base: dict[str, object] = {
        "id": "t1",
        "message": "Was invoice INV-00006 charged twice?",
        "customer_id": "CUST-0001",
        "calls": [
            RecordedCall(
                "billing_lookup",
                {"customer_id": "CUST-0001", "invoice_id": "INV-00006"},
                "OK",
                '{"invoice": "INV-00006", "payments": 2}',
            )
        ],
        "expected": [ExpectedCall("billing_lookup", {"invoice_id": "INV-00006"})],
    }
    base.update(kw)
    return TurnRecord(**base)  # type: ignore[arg-type]


async def test_recorded_tools_answer_by_arguments_then_by_name() -> None:
    tools = RecordedTools(
        [
            RecordedCall("kb_search", {"query": "refunds"}, "OK", '{"hit": "refunds"}'),
            RecordedCall("kb_search", {"query": "invoices"}, "OK", '{"hit": "invoices"}'),
        ]
    )
    exact, by_name, unknown = await tools.execute(
        [
            ToolInvocation("a", "kb_search", '{"query":"invoices"}'),
            ToolInvocation("b", "kb_search", '{"query":"something else"}'),
            ToolInvocation("c", "crm_lookup", "{}"),
        ],
        principal=Principal("CUST-0001"),
        timeout_s=1,
    )
    assert (exact.status, exact.result_json) == ("OK", '{"hit": "invoices"}')
    assert (by_name.status, by_name.result_json) == ("OK", '{"hit": "refunds"}')
    assert unknown.status == "NOT_FOUND"


async def test_replay_feeds_recorded_results_back_and_scores_the_calls(tmp_path: Path) -> None:
    def args(name: str, lane: object, n: int, messages: object) -> EmittedCall:
        return EmittedCall(ToolCall(f"c{n}", name, '{"invoice_id": "inv-00006"}'), ok=True)

    inference = FakeInference(plan=lambda i, m: planned("billing_lookup"), args=args)
    no_tool = _record(id="t2", message="Thanks!", calls=[], expected=[])
    report = await replay(
        [_record(), no_tool], inference, PROFILE, REGISTRY, lane="workhorse", caps=CAPS
    )
    # The recorded result reached the answer's prompt: the tool ran from the record.
    answer_prompts = [c.messages for c in inference.of_kind("answer")]
    assert any(
        '\\"payments\\": 2' in m.content or '"payments": 2' in m.content for m in answer_prompts[0]
    )
    # Every stage ran on the forced lane.
    assert {c.lane.lane for c in inference.calls} == {"workhorse"}
    first, second = report.turns
    assert first.made == [
        {
            "name": "billing_lookup",
            "arguments": {"customer_id": "CUST-0001", "invoice_id": "inv-00006"},
        }
    ]
    assert (first.name_hits, first.argument_hits) == (1, 1)
    # The fake plans billing_lookup on the no-tool turn too: a wrong abstention.
    assert second.made[0]["name"] == "billing_lookup"
    out = report.to_dict()
    assert out["scores"]["by_name"]["f1"] == 1.0
    assert out["scores"]["abstention_accuracy"] == 0.0
    assert out["turns"] == 2 and out["errors"] == 0

    prom = tmp_path / "textfile" / "agentmesh_replay.prom"
    write_textfile(prom, report_registry(report, "unit"))
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    (sample,) = families["agentmesh_replay_tool_selection_f1"].samples
    assert sample.value == 1.0
    assert sample.labels == {"lane": "workhorse", "gold_set": "unit"}


async def test_recorder_writes_a_redacted_record_replay_can_read(tmp_path: Path) -> None:
    path = tmp_path / "turns.jsonl"
    tools = FakeTools()
    inference = FakeInference(
        plan=lambda i, m: planned("crm_lookup"),
        answer="I wrote to chloe.white@maplesystems.example and +1-555-758-2952.",
    )
    runner = TurnRunner(inference, tools, PROFILE, tracer=TurnRecorder(path))
    inp = TurnInput(
        session_id="s1",
        turn_index=1,
        history=(),
        user_message="My card 4111 1111 1111 1111 was charged, email me at a.b@c.example",
        registry=REGISTRY,
        caps=CAPS,
        customer_id="CUST-0001",
    )
    async for _ in runner.run(inp):
        pass
    (record,) = read_records(path)
    text = path.read_text()
    assert "4111" not in text and "a.b@c.example" not in text and "555-758" not in text
    assert "[card]" in record.message and "[email]" in record.message
    assert "[phone]" in record.answer and "[email]" in record.answer
    assert record.customer_id == "CUST-0001" and record.id == "s1-t1"
    assert [c.name for c in record.calls] == ["crm_lookup"]
    assert record.calls[0].status == "OK" and record.calls[0].result_json
    assert json.loads(record.calls[0].result_json)  # the unfenced body, valid JSON
    assert record.lanes and record.latency_s > 0 and record.outcome == "completed"
    assert "crm_lookup" in record.tools_offered
    assert record.reference[0].name == "crm_lookup"  # no labels: the recorded calls


def test_unfence_and_roundtrip(tmp_path: Path) -> None:
    fenced = '<tool_result tool="x" call_id="c" status="OK">\n{"a": 1}\n</tool_result>'
    assert unfence(fenced) == '{"a": 1}'
    assert unfence("plain") == "plain"
    path = tmp_path / "r.jsonl"
    write_records(path, [_record()])
    assert read_records(path) == [_record()]


def test_the_gold_set_is_well_formed() -> None:
    records = read_records(GOLD)
    assert len(records) >= 50
    assert len({r.id for r in records}) == len(records)
    tags = {t for r in records for t in r.tags}
    assert {"no_tool", "anonymous", "write", "injection", "multi_turn"} <= tags
    names = {"crm_lookup", "kb_search", "billing_lookup", "billing_refund", "billing_credit"}
    for r in records:
        assert r.expected is not None, r.id
        assert {e.name for e in r.expected} <= names, r.id
        # Principal-bound arguments are the orchestrator's, never a label.
        assert all("customer_id" not in (e.arguments or {}) for e in r.expected), r.id
        if not r.customer_id:  # anonymous: only the knowledge base is offered
            assert {e.name for e in r.expected} <= {"kb_search"}, r.id
        # Every read the labels expect has a recorded result to feed back.
        reads = {e.name for e in r.expected} - {"billing_refund", "billing_credit"}
        assert reads <= {c.name for c in r.calls if c.status == "OK"}, r.id
    assert sum(1 for r in records if r.expected == []) >= 5
    assert sum(1 for r in records if r.history) >= 3
