"""A scripted model for a whole planned turn on the fake engine (tests/inference/fakes.py):
it plans ``PLAN``, writes each planned call's ``ARGS`` and answers ``ANSWER``, the stage read
from the last instruction in the prompt. Shared by the tests that run a turn through the real
services over ``FakeEngineFactory(script=script)``."""

from __future__ import annotations

import json

from services.inference.engine import GenParams
from tests.inference.fakes import hermes_rest, prefilled_tool

PLAN = {
    "calls": [
        {"tool": "billing_lookup", "intent": "the invoices"},
        {"tool": "kb_search", "intent": "double charges"},
    ],
    "reasoning": "billing question",
}
ARGS = {"billing_lookup": {}, "kb_search": {"query": "charged twice"}}
ANSWER = "Your June invoice was paid twice; write to billing@lumen.example for the refund."


def script(ids: list[int], params: GenParams) -> str:
    """'The model': the stage is the last instruction in the prompt."""
    prompt = "".join(chr(i) for i in ids)
    marks = {
        "plan": prompt.rfind("Plan the tools to call"),
        "emit": prompt.rfind("now with arguments taken from"),
        "answer": prompt.rfind("Write the reply to the customer now"),
    }
    stage = max(marks, key=lambda k: marks[k])
    if stage == "plan":
        return json.dumps(PLAN)
    if stage == "emit":
        # CallTools prefilled the call's opener: the model writes the arguments and the closer.
        name = prefilled_tool(ids)
        assert name in ARGS, prompt[-80:]
        return hermes_rest(ARGS[name])
    return ANSWER
