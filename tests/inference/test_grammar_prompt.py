"""Tool-call grammars (checked with xgrammar's matcher), parsing, and prompt rendering."""

from __future__ import annotations

import json

import pytest
from agentmesh.common.v1 import common_pb2
from xgrammar.testing import _is_grammar_accept_string as accepts

from services.inference.config import TEMPLATES_DIR, FewShotExemplar, ToolCallFormat
from services.inference.prompt import PromptRenderer, messages_to_dicts, parse_tools
from services.inference.tool_calls import (
    CALL_SHAPES,
    BoundedMemo,
    GrammarBuilder,
    parse_calls,
    parse_selection,
)
from shared.errors import InvalidArgument

HERMES = ToolCallFormat.HERMES
LLAMA = ToolCallFormat.LLAMA3_JSON


def spec(name: str, schema: dict[str, object] | str) -> common_pb2.ToolSpec:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return common_pb2.ToolSpec(name=name, description=f"{name} tool", parameters_json_schema=text)


LOOKUP = {
    "type": "object",
    "properties": {"customer_id": {"type": "string"}},
    "required": ["customer_id"],
    "additionalProperties": False,
}
INVOICE = {
    "type": "object",
    "properties": {"invoice_id": {"type": "string"}, "limit": {"type": "integer"}},
    "required": ["invoice_id"],
}
TOOLS = parse_tools([spec("crm_lookup", LOOKUP), spec("billing_invoice", INVOICE)])


def test_single_tool_grammar_is_compact_hermes() -> None:
    g = GrammarBuilder().single_tool(TOOLS[0], HERMES)
    good = '<tool_call>\n{"name":"crm_lookup","arguments":{"customer_id":"C-1"}}\n</tool_call>'
    assert accepts(g, good)
    spaced = (
        '<tool_call>\n{"name": "crm_lookup", "arguments": {"customer_id": "C-1"}}\n</tool_call>'
    )
    assert not accepts(g, spaced)
    wrong_name = good.replace("crm_lookup", "billing_invoice")
    assert not accepts(g, wrong_name)
    missing = '<tool_call>\n{"name":"crm_lookup","arguments":{}}\n</tool_call>'
    assert not accepts(g, missing)


PREFILL_CASES = [
    (
        HERMES,
        '<tool_call>\n{"name":"crm_lookup","arguments":',
        '{"customer_id":"C-1"}}\n</tool_call>',
    ),
    (LLAMA, '{"name":"crm_lookup","parameters":', '{"customer_id":"C-1"}}'),
]


@pytest.mark.parametrize(("fmt", "opener", "rest"), PREFILL_CASES, ids=["hermes", "llama3_json"])
def test_prefilled_opener_plus_arguments_grammar_is_the_single_tool_grammar(
    fmt: ToolCallFormat, opener: str, rest: str
) -> None:
    b = GrammarBuilder()
    assert CALL_SHAPES[fmt].opener("crm_lookup") == opener
    args = b.arguments(TOOLS[0], fmt)
    assert "crm_lookup" not in args  # it starts at the arguments object
    assert accepts(args, rest) and accepts(b.single_tool(TOOLS[0], fmt), opener + rest)
    for bad in [
        rest.replace('"C-1"', '"C-1","extra":1'),  # additionalProperties
        rest.replace('{"customer_id":"C-1"}', "{}"),  # required
        rest.replace('"customer_id":', '"customer_id": '),  # not compact
        rest[:-1],  # the closer cut short
        opener + rest,  # the opener is not decoded again
    ]:
        assert not accepts(args, bad), bad
    assert b.arguments(TOOLS[0], fmt) is args  # memoized


def test_calls_grammar_allows_one_to_n_calls() -> None:
    g = GrammarBuilder().calls(TOOLS, HERMES, 1, 2)
    one = '<tool_call>\n{"name":"crm_lookup","arguments":{"customer_id":"C-1"}}\n</tool_call>'
    two = (
        one
        + '\n<tool_call>\n{"name":"billing_invoice","arguments":{"invoice_id":"I"}}\n</tool_call>'
    )
    assert accepts(g, one)
    assert accepts(g, two)
    assert not accepts(g, two + "\n" + one)  # three calls > max 2
    assert not accepts(g, "I'd rather chat")  # required: no free text


def test_auto_grammar_allows_text_instead_of_calls() -> None:
    g = GrammarBuilder().calls(TOOLS, HERMES, 0, 2)
    assert accepts(g, "Hello there")
    assert accepts(
        g, '<tool_call>\n{"name":"crm_lookup","arguments":{"customer_id":"x"}}\n</tool_call>'
    )


def test_llama3_json_grammar_is_one_bare_call() -> None:
    g = GrammarBuilder().calls(TOOLS, LLAMA, 1, 5)
    one = '{"name":"crm_lookup","parameters":{"customer_id":"C"}}'
    assert accepts(g, one)
    assert not accepts(g, one + "\n" + one)
    assert not accepts(g, '{"name":"crm_lookup","arguments":{"customer_id":"C"}}')


def test_sequence_and_selection_grammars() -> None:
    b = GrammarBuilder()
    seq = b.sequence([TOOLS[1], TOOLS[0]], HERMES)
    text = (
        '<tool_call>\n{"name":"billing_invoice","arguments":{"invoice_id":"I"}}\n</tool_call>\n'
        '<tool_call>\n{"name":"crm_lookup","arguments":{"customer_id":"C"}}\n</tool_call>'
    )
    assert accepts(seq, text)
    sel = b.selection(TOOLS, 1, 2)
    assert accepts(sel, '["crm_lookup","billing_invoice"]')
    assert not accepts(sel, "[]")
    assert not accepts(sel, '["unknown"]')
    assert accepts(b.selection(TOOLS, 0, 2), "[]")


def test_grammars_are_memoized() -> None:
    b = GrammarBuilder()
    assert b.calls(TOOLS, HERMES, 1, 3) is b.calls(TOOLS, HERMES, 1, 3)


def test_bounded_memo_drops_the_least_recently_used() -> None:
    memo: BoundedMemo[str, int] = BoundedMemo(2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # "a" is now the most recent
    memo.put("c", 3)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (1, None, 3)


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ("{not json", "not valid JSON"),
        ('["array"]', "must be a JSON object"),
        ({"type": "object", "properties": {"a": {"type": 5}}}, "not a valid JSON Schema"),
        ({"type": "string"}, "must describe an object"),
    ],
)
def test_invalid_tool_schema_names_the_tool(schema: object, why: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_tools([spec("good", LOOKUP), spec("broken_tool", schema)])  # type: ignore[arg-type]
    assert "broken_tool" in err.value.message
    assert why in err.value.message
    assert err.value.field == "tools[1].parameters_json_schema"


def test_parse_calls_validates_each_call() -> None:
    text = (
        '<tool_call>\n{"name":"crm_lookup","arguments":{"customer_id":"C-9"}}\n</tool_call>\n'
        '<tool_call>\n{"name":"crm_lookup","arguments":{"customer":"C-9"}}\n</tool_call>\n'
        '<tool_call>\n{"name":"nope","arguments":{}}\n</tool_call>\n'
        "<tool_call>\n{broken\n</tool_call>"
    )
    calls = parse_calls(text, TOOLS, HERMES)
    assert [c.ok for c in calls] == [True, False, False, False]
    assert calls[0].arguments_json == '{"customer_id":"C-9"}'
    assert "schema" in calls[1].error
    assert "unknown tool" in calls[2].error
    assert "not valid JSON" in calls[3].error
    assert len({c.id for c in calls}) == 4


def test_parse_llama3_json_calls() -> None:
    calls = parse_calls(
        '<|python_tag|>{"name":"crm_lookup","parameters":{"customer_id":"C"}}', TOOLS, LLAMA
    )
    assert len(calls) == 1 and calls[0].ok and calls[0].name == "crm_lookup"
    assert parse_calls("Just text", TOOLS, LLAMA) == []


def test_parse_selection() -> None:
    assert parse_selection('["crm_lookup","x","billing_invoice"]', TOOLS, 5) == [
        "crm_lookup",
        "billing_invoice",
    ]
    assert parse_selection("nope", TOOLS, 5) is None


def _msgs(user: str) -> list[dict[str, object]]:
    return messages_to_dicts(
        [
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="You are a support agent."),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=user),
        ]
    )


@pytest.mark.parametrize("template", ["hermes_tools.jinja", "llama3_json_tools.jinja"])
def test_prefix_is_byte_identical_across_calls(template: str) -> None:
    renderer = PromptRenderer(
        TEMPLATES_DIR / template,
        [FewShotExemplar(user="u", tool_name="crm_lookup", arguments={"customer_id": "C"})],
    )
    tools_again = parse_tools([spec("crm_lookup", LOOKUP), spec("billing_invoice", INVOICE)])
    a = renderer.render(_msgs("first question"), TOOLS, with_few_shot=True)
    b = renderer.render(_msgs("a different question"), tools_again, with_few_shot=True)
    cut = a.index("first question")
    assert a[:cut] == b[:cut]  # system + tools + exemplars: same bytes
    assert "crm_lookup" in a[:cut] and '"customer_id":{"type":"string"}' in a[:cut]


def test_history_with_tool_calls_and_results_renders() -> None:
    renderer = PromptRenderer(TEMPLATES_DIR / "hermes_tools.jinja")
    messages = messages_to_dicts(
        [
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="status of C-1?"),
            common_pb2.ChatMessage(
                role=common_pb2.ROLE_ASSISTANT,
                tool_calls=[
                    common_pb2.ToolCall(
                        id="call_1", name="crm_lookup", arguments_json='{"customer_id": "C-1"}'
                    )
                ],
            ),
            common_pb2.ChatMessage(
                role=common_pb2.ROLE_TOOL,
                tool_call_id="call_1",
                name="crm_lookup",
                content='{"status":"active"}',
            ),
        ]
    )
    text = renderer.render(messages, TOOLS)
    assert (
        '<tool_call>\n{"name":"crm_lookup","arguments":{"customer_id":"C-1"}}\n</tool_call>' in text
    )
    assert '<tool_response>\n{"status":"active"}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_bad_messages() -> None:
    with pytest.raises(InvalidArgument) as empty:
        messages_to_dicts([])
    assert empty.value.field == "messages"
    with pytest.raises(InvalidArgument) as bad_args:
        messages_to_dicts(
            [
                common_pb2.ChatMessage(
                    role=common_pb2.ROLE_ASSISTANT,
                    tool_calls=[common_pb2.ToolCall(name="x", arguments_json="{oops")],
                )
            ]
        )
    assert bad_args.value.field == "messages[0].tool_calls[0].arguments_json"
    with pytest.raises(InvalidArgument):
        messages_to_dicts([common_pb2.ChatMessage(content="no role")])


def test_answer_or_calls_grammar_is_text_without_the_opener_or_valid_calls() -> None:
    g = GrammarBuilder().answer_or_calls(TOOLS, HERMES, 2)
    one = '<tool_call>\n{"name":"crm_lookup","arguments":{"customer_id":"C-1"}}\n</tool_call>'
    assert accepts(g, one) and accepts(g, one + "\n" + one)
    assert not accepts(g, "\n".join([one] * 3))  # max_calls
    assert not accepts(g, one.replace('"C-1"', "1"))  # schema
    for text in ["Your invoice is paid.", "a < b and <b>bold</b>", "<tool_cal>", "", "<tool_"]:
        assert accepts(g, text), text
    for text in [" " + one, "Let me check. <tool_call>", "<<tool_call>", "x<tool_call>\n{}"]:
        assert not accepts(g, text), text
    llama = GrammarBuilder().answer_or_calls(TOOLS, LLAMA, 5)
    call = '{"name":"crm_lookup","parameters":{"customer_id":"C-1"}}'
    assert accepts(llama, call) and not accepts(llama, call + call)  # one call per generation
    assert accepts(llama, "Sure {x}") and not accepts(llama, '  {"name":"x"}')
