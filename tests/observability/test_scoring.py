"""Tool-call F1, exactly, on a hand-checked fixture: partial matches, extra and missing calls,
order differences, repeated names (maximum matching, not greedy), no-tool turns."""

from __future__ import annotations

import pytest

from services.orchestrator.replay.records import ExpectedCall as E
from services.orchestrator.replay.scoring import MadeCall as M
from services.orchestrator.replay.scoring import Score, arguments_match, normalise

FIXTURE: list[tuple[list[E], list[M]]] = [
    # 1. order differs, one call missing; argument values differ only in case and spaces
    (
        [E("crm_lookup", {}), E("kb_search"), E("billing_lookup", {"invoice_id": "INV-00006"})],
        [
            M("billing_lookup", {"invoice_id": " inv-00006 ", "customer_id": "CUST-0001"}),
            M("crm_lookup", {"customer_id": "CUST-0001"}),
        ],
    ),
    # 2. the right call ("49.00" == 49) plus an extra one
    (
        [E("billing_refund", {"invoice_id": "INV-00023", "amount": 49})],
        [
            M("billing_refund", {"invoice_id": "INV-00023", "amount": "49.00"}),
            M("billing_credit", {"amount": 10}),
        ],
    ),
    # 3. the same tool twice: both names match, one argument set is wrong
    (
        [
            E("billing_lookup", {"invoice_id": "INV-00012"}),
            E("billing_lookup", {"invoice_id": "INV-00011"}),
        ],
        [
            M("billing_lookup", {"invoice_id": "INV-00011"}),
            M("billing_lookup", {"invoice_id": "INV-00099"}),
        ],
    ),
    # 4. a greedy pairing would give the free expectation the only call that fits the
    #    specific one; the maximum matching pairs both
    (
        [E("kb_search"), E("kb_search", {"query": "Refund policy"})],
        [M("kb_search", {"query": "refund  POLICY"}), M("kb_search", {"query": "invoices"})],
    ),
    # 5. no tool needed, none called: right abstention
    ([], []),
    # 6. no tool needed, one called: wrong abstention, and not part of the F1
    ([], [M("kb_search", {"query": "hello"})]),
]


def test_f1_on_the_hand_checked_fixture() -> None:
    score = Score()
    per_turn = [score.add(expected, made) for expected, made in FIXTURE]
    assert per_turn == [(2, 2), (1, 1), (2, 1), (2, 2), (0, 0), (0, 0)]
    # by name: tp 2+1+2+2 = 7, fp 0+1+0+0 = 1, fn 1+0+0+0 = 1
    assert (score.name.tp, score.name.fp, score.name.fn) == (7, 1, 1)
    assert score.name.precision == pytest.approx(7 / 8)
    assert score.name.recall == pytest.approx(7 / 8)
    assert score.name.f1 == pytest.approx(0.875)
    # by name + arguments: tp 2+1+1+2 = 6, fp 0+1+1+0 = 2, fn 1+0+1+0 = 2
    assert (score.arguments.tp, score.arguments.fp, score.arguments.fn) == (6, 2, 2)
    assert score.arguments.precision == pytest.approx(0.75)
    assert score.arguments.recall == pytest.approx(0.75)
    assert score.arguments.f1 == pytest.approx(0.75)
    assert (score.abstain_right, score.abstain_total, score.tool_turns) == (1, 2, 4)
    assert score.abstention == pytest.approx(0.5)
    assert score.row()["by_name"]["f1"] == 0.875


def test_order_of_calls_never_changes_the_score() -> None:
    for expected, made in FIXTURE:
        forward, backward = Score(), Score()
        assert forward.add(expected, made) == backward.add(expected, list(reversed(made)))
        assert forward.add(list(reversed(expected)), made) == backward.add(expected, made)


def test_all_wrong_and_empty_scores_are_zero() -> None:
    score = Score()
    score.add([E("crm_lookup")], [M("kb_search", {})])
    assert (score.name.tp, score.name.fp, score.name.fn) == (0, 1, 1)
    assert score.f1 == 0.0
    assert Score().f1 == 0.0
    assert Score().abstention == 0.0


def test_value_normalisation() -> None:
    assert normalise("  Hello   World ") == "hello world"
    assert normalise("19.00") == normalise(19) == 19.0
    assert normalise(True) is True
    assert normalise({"a": [" X "]}) == {"a": ["x"]}
    assert arguments_match(None, {"anything": 1})
    assert arguments_match({}, {"anything": 1})
    assert not arguments_match({"amount": 49}, {})
    assert not arguments_match({"amount": 49}, {"amount": 49.5})
