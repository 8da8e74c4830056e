"""CountTokens, "continue or answer" streaming, sampling validation and ListLanes' dtype, through
a real gRPC server on 127.0.0.1:0 over the fake engine (one token per character)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb

from services.inference.config import TEMPLATES_DIR, LanesConfig, ToolCallFormat
from services.inference.counting import truncate_to_tokens
from services.inference.engine import GenParams
from services.inference.prompt import PromptRenderer, messages_to_dicts, parse_tools
from services.inference.tool_calls import GrammarBuilder
from tests.inference.fakes import (
    Fake,
    FakeEngine,
    FakeEngineFactory,
    llama3_json_speed,
    start_fake,
)

LOOKUP = {
    "type": "object",
    "properties": {"customer_id": {"type": "string", "pattern": "^C-[0-9]+$"}},
    "required": ["customer_id"],
    "additionalProperties": False,
}


def tool(name: str) -> common_pb2.ToolSpec:
    return common_pb2.ToolSpec(
        name=name, description=f"does {name}", parameters_json_schema=json.dumps(LOOKUP)
    )


TOOLS = [tool("crm_lookup"), tool("billing_lookup")]


def convo(text: str) -> list[common_pb2.ChatMessage]:
    return [
        common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="You are a support agent."),
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text),
    ]


def hermes(name: str, args: dict[str, object]) -> str:
    body = json.dumps({"name": name, "arguments": args}, separators=(",", ":"))
    return f"<tool_call>\n{body}\n</tool_call>"


def auto(**kwargs: object) -> pb.StreamGenerateRequest:
    return pb.StreamGenerateRequest(
        messages=convo("Where is my order?"),
        tools=TOOLS,
        tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    f = await start_fake(FakeEngineFactory())
    yield f
    await f.close()


def kinds(events: list[pb.StreamGenerateResponse]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


async def read_rest(call: object) -> list[pb.StreamGenerateResponse]:
    """The rest of a stream read with read() (grpc forbids mixing read() and iteration)."""
    out = []
    while (item := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        out.append(item)
    return out


def text_only(events: list[pb.StreamGenerateResponse]) -> list[str]:
    """The kinds of a plain text stream: text deltas, then the summary."""
    return ["text_delta"] * (len(events) - 1) + ["summary"]


def text_of(events: list[pb.StreamGenerateResponse]) -> str:
    return "".join(e.text_delta for e in events if e.WhichOneof("event") == "text_delta")


# ---- CountTokens --------------------------------------------------------------------------


async def test_count_tokens_matches_the_rendered_prompt_and_generate(fake: Fake) -> None:
    messages = convo("What is the status of C-42?")
    reply = await fake.stub.CountTokens(
        pb.CountTokensRequest(
            messages=messages,
            tools=TOOLS,
            lane=pb.LaneSelector(lane="planner"),
            texts=["four", ""],
        ),
        timeout=10,
    )
    renderer = PromptRenderer(TEMPLATES_DIR / "hermes_tools.jinja")
    rendered = renderer.render(messages_to_dicts(messages), parse_tools(TOOLS))
    assert reply.prompt_tokens == len(rendered)  # the fake: one token per character
    assert list(reply.message_tokens) == [len(m.content) for m in messages]
    assert [(t.tokens, t.truncated) for t in reply.texts] == [(4, False), (0, False)]
    assert reply.max_model_len == 4096
    assert reply.lane.lane == "planner" and reply.lane.model
    assert not fake.engine.requests  # no generation
    generated = await fake.stub.Generate(
        pb.GenerateRequest(messages=messages, tools=TOOLS, lane=pb.LaneSelector(lane="planner")),
        timeout=10,
    )
    assert generated.usage.prompt_tokens == reply.prompt_tokens
    prompt_ids, _ = fake.engine.requests[-1]
    assert len(prompt_ids) == reply.prompt_tokens


async def test_count_tokens_without_messages_counts_texts_only(fake: Fake) -> None:
    reply = await fake.stub.CountTokens(
        pb.CountTokensRequest(texts=["abcdef", "ab", "abc"], truncate_texts_to=3), timeout=10
    )
    assert reply.prompt_tokens == 0 and not reply.message_tokens
    got = [(t.tokens, t.truncated, t.truncated_text) for t in reply.texts]
    assert got == [(6, True, "abc"), (2, False, ""), (3, False, "")]
    assert reply.lane.lane == "workhorse"  # automatic selection like the other RPCs


async def test_count_tokens_serves_while_the_lane_is_at_its_cap() -> None:
    gate = asyncio.Event()

    def configure(lanes: LanesConfig) -> None:
        lanes.lanes["speed"].max_concurrency = 1

    f = await start_fake(FakeEngineFactory(hold_after_first=gate), configure)
    try:
        f.engine.script = lambda ids, p: "x" * 40
        busy = f.stub.StreamGenerate(
            pb.StreamGenerateRequest(messages=convo("a"), lane=pb.LaneSelector(lane="speed")),
            timeout=30,
        )
        first = await busy.read()  # holds the speed lane's only slot; the engine is mid-request
        assert first.WhichOneof("event") == "text_delta" and f.engine.live
        reply = await f.stub.CountTokens(
            pb.CountTokensRequest(messages=convo("b"), lane=pb.LaneSelector(lane="speed")),
            timeout=10,
        )
        assert reply.prompt_tokens > 0 and reply.lane.lane == "speed"
        gate.set()
        rest = await read_rest(busy)
        assert kinds(rest)[-1] == "summary"
    finally:
        gate.set()
        await f.close()


class ByteTokenizer(FakeEngine):
    """One token per UTF-8 byte: cutting inside a character decodes to U+FFFD."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int]) -> str:
        return bytes(token_ids).decode(errors="replace")


def test_truncation_never_ends_inside_a_character_and_re_encodes_within_the_limit() -> None:
    engine = ByteTokenizer("bytes")
    text = "hé€llo"
    ids = engine.encode(text)
    for limit in range(1, len(ids)):
        cut = truncate_to_tokens(engine, ids, limit)
        assert len(engine.encode(cut)) <= limit
        assert text.startswith(cut) and "\ufffd" not in cut
    assert truncate_to_tokens(engine, ids, 2) == "h"  # "h" + half of "é"
    assert truncate_to_tokens(engine, ids, 3) == "hé"


LIMITS = [
    ("messages", pb.CountTokensRequest(messages=convo("x") * 129)),
    ("texts", pb.CountTokensRequest(texts=["x"] * 257)),
    ("texts", pb.CountTokensRequest(messages=convo("x"), texts=["y" * 250_000] * 5)),
    ("messages", pb.CountTokensRequest(messages=convo("z" * 250_000) * 5)),
]


@pytest.mark.parametrize(
    ("field", "req"), LIMITS, ids=["258 msgs", "257 texts", "1.5MiB", "1MiB+1"]
)
async def test_count_tokens_limits(fake: Fake, field: str, req: pb.CountTokensRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fake.stub.CountTokens(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}:")


async def test_count_tokens_at_the_limits_is_fine(fake: Fake) -> None:
    reply = await fake.stub.CountTokens(
        pb.CountTokensRequest(messages=convo("x") * 128, texts=["y"] * 256), timeout=10
    )
    assert len(reply.message_tokens) == 256 and len(reply.texts) == 256


# ---- continue or answer -------------------------------------------------------------------


async def test_auto_text_answer_streams_as_it_is_generated() -> None:
    gate = asyncio.Event()
    f = await start_fake(FakeEngineFactory(hold_after_first=gate))
    try:
        answer = "Your order ships tomorrow; no lookup needed."
        f.engine.script = lambda ids, p: answer
        call = f.stub.StreamGenerate(auto(), timeout=30)
        first = await call.read()
        # Streamed before the generation went on: nothing waits for the whole answer.
        assert first.WhichOneof("event") == "text_delta" and first.text_delta == answer[:4]
        assert f.engine.live
        gate.set()
        events = [first, *await read_rest(call)]
    finally:
        gate.set()
        await f.close()
    assert text_of(events) == answer
    assert kinds(events) == text_only(events)
    assert events[-1].summary.usage.completion_tokens == len(answer)
    _, params = f.engine.requests[-1]
    tools = parse_tools(TOOLS)
    assert params.grammar == GrammarBuilder().answer_or_calls(tools, ToolCallFormat.HERMES, 5)


async def test_auto_tool_call_is_one_event_and_never_text(fake: Fake) -> None:
    out = (
        "\n"
        + hermes("crm_lookup", {"customer_id": "C-7"})
        + "\n"
        + hermes("billing_lookup", {"customer_id": "C-7"})
    )
    fake.engine.script = lambda ids, p: out
    fake.engine.delta_chars = 1  # the opener arrives one character at a time
    events = [e async for e in fake.stub.StreamGenerate(auto(), timeout=10)]
    assert kinds(events) == ["tool_calls", "summary"]
    calls = events[0].tool_calls.calls
    assert [c.call.name for c in calls] == ["crm_lookup", "billing_lookup"]
    assert all(c.outcome == pb.PARSE_OUTCOME_OK for c in calls)
    assert json.loads(calls[0].call.arguments_json) == {"customer_id": "C-7"}
    assert calls[0].raw_text.startswith("<tool_call>") and calls[0].call.id
    assert events[1].summary.usage.completion_tokens == len(out)
    assert events[1].summary.finish_reason == pb.FINISH_REASON_STOP
    registry = fake.service.metrics_registry
    labels = {"lane": "workhorse", "outcome": "ok"}
    assert registry.get_sample_value("agentmesh_inference_tool_calls_total", labels) == 2


async def test_auto_invalid_call_is_reported_failed(fake: Fake) -> None:
    fake.engine.script = lambda ids, p: hermes("crm_lookup", {"customer_id": "nope"})
    events = [e async for e in fake.stub.StreamGenerate(auto(), timeout=10)]
    assert kinds(events) == ["tool_calls", "summary"]
    (bad,) = events[0].tool_calls.calls
    assert bad.outcome == pb.PARSE_OUTCOME_FAILED
    assert "schema" in bad.parse_error and bad.call.name == "crm_lookup"


async def test_auto_call_cut_short_is_failed_not_text(fake: Fake) -> None:
    fake.engine.script = lambda ids, p: hermes("crm_lookup", {"customer_id": "C-1"})
    events = [
        e
        async for e in fake.stub.StreamGenerate(
            auto(sampling=pb.SamplingParams(max_tokens=20)), timeout=10
        )
    ]
    assert kinds(events) == ["tool_calls", "summary"]
    (cut,) = events[0].tool_calls.calls
    assert cut.outcome == pb.PARSE_OUTCOME_FAILED
    assert events[1].summary.finish_reason == pb.FINISH_REASON_LENGTH


async def test_auto_caps_calls_at_max_calls(fake: Fake) -> None:
    fake.engine.script = lambda ids, p: "\n".join(
        hermes("crm_lookup", {"customer_id": f"C-{i}"}) for i in range(3)
    )
    events = [e async for e in fake.stub.StreamGenerate(auto(max_calls=2), timeout=10)]
    assert len(events[0].tool_calls.calls) == 2
    _, params = fake.engine.requests[-1]
    assert params.grammar == GrammarBuilder().answer_or_calls(
        parse_tools(TOOLS), ToolCallFormat.HERMES, 2
    )


async def test_required_uses_the_calls_only_grammar_and_never_streams(fake: Fake) -> None:
    req = auto()
    req.tool_choice.mode = pb.ToolChoice.MODE_REQUIRED
    fake.engine.script = lambda ids, p: "I would rather chat."  # a fake ignores grammars
    events = [e async for e in fake.stub.StreamGenerate(req, timeout=10)]
    assert kinds(events) == ["tool_calls", "summary"]
    (failed,) = events[0].tool_calls.calls
    assert failed.outcome == pb.PARSE_OUTCOME_FAILED and failed.raw_text == "I would rather chat."
    _, params = fake.engine.requests[-1]
    assert params.grammar == GrammarBuilder().calls(parse_tools(TOOLS), ToolCallFormat.HERMES, 1, 5)
    # Default budget: one call's tokens per allowed call (workhorse: 96 x 5).
    assert params.max_tokens == 96 * 5


async def test_unspecified_mode_is_text_only_as_before(fake: Fake) -> None:
    out = hermes("crm_lookup", {"customer_id": "C-1"})
    fake.engine.script = lambda ids, p: out
    req = pb.StreamGenerateRequest(messages=convo("hi"), tools=TOOLS)
    events = [e async for e in fake.stub.StreamGenerate(req, timeout=10)]
    assert text_of(events) == out and kinds(events) == text_only(events)
    _, params = fake.engine.requests[-1]
    assert params.grammar is None
    # MODE_AUTO without tools is a plain text stream too.
    no_tools = pb.StreamGenerateRequest(
        messages=convo("hi"), tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO)
    )
    events = [e async for e in fake.stub.StreamGenerate(no_tools, timeout=10)]
    assert text_of(events) == out
    assert fake.engine.requests[-1][1].grammar is None


async def test_llama3_json_lane_calls_in_its_own_format() -> None:
    f = await start_fake(FakeEngineFactory(), llama3_json_speed)
    try:
        body = json.dumps({"name": "crm_lookup", "parameters": {"customer_id": "C-3"}})
        f.engine.script = lambda ids, p: body
        events = [e async for e in f.stub.StreamGenerate(auto(lane=pb.LaneSelector(lane="speed")))]
        assert kinds(events) == ["tool_calls", "summary"]
        (call,) = events[0].tool_calls.calls
        assert call.outcome == pb.PARSE_OUTCOME_OK and call.call.name == "crm_lookup"
        f.engine.script = lambda ids, p: "Happy to help."
        events = [e async for e in f.stub.StreamGenerate(auto(lane=pb.LaneSelector(lane="speed")))]
        assert text_of(events) == "Happy to help." and kinds(events) == text_only(events)
    finally:
        await f.close()


STREAM_BAD = [
    ("named", pb.ToolChoice.MODE_NAMED, TOOLS, "", "tool_choice.mode"),
    ("required, no tools", pb.ToolChoice.MODE_REQUIRED, [], "", "tools"),
    ("auto + schema", pb.ToolChoice.MODE_AUTO, TOOLS, '{"type":"object"}', "response_format"),
]


@pytest.mark.parametrize(
    ("mode", "tools", "schema", "field"),
    [c[1:] for c in STREAM_BAD],
    ids=[c[0] for c in STREAM_BAD],
)
async def test_stream_tool_choice_errors(
    fake: Fake, mode: int, tools: list[common_pb2.ToolSpec], schema: str, field: str
) -> None:
    req = pb.StreamGenerateRequest(
        messages=convo("x"),
        tools=tools,
        tool_choice=pb.ToolChoice(mode=mode),  # type: ignore[arg-type]
        response_format=pb.ResponseFormat(json_schema=schema),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in fake.stub.StreamGenerate(req, timeout=10):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}")
    assert not fake.engine.requests


# ---- sampling validation ------------------------------------------------------------------

SAMPLING_BAD = [
    ("temperature", pb.SamplingParams(temperature=-0.1)),
    ("temperature", pb.SamplingParams(temperature=2.5)),
    ("temperature", pb.SamplingParams(temperature=float("nan"))),
    ("top_p", pb.SamplingParams(top_p=0.0)),
    ("top_p", pb.SamplingParams(top_p=1.5)),
    ("top_p", pb.SamplingParams(top_p=-1.0)),
    ("max_tokens", pb.SamplingParams(max_tokens=4097)),
    ("stop", pb.SamplingParams(stop=[f"s{i}" for i in range(9)])),
    ("stop[1]", pb.SamplingParams(stop=["ok", "x" * 65])),
    ("stop[0]", pb.SamplingParams(stop=[""])),
]


def _requests(sampling: pb.SamplingParams) -> list[tuple[str, object]]:
    return [
        ("Generate", pb.GenerateRequest(messages=convo("x"), sampling=sampling)),
        ("StreamGenerate", pb.StreamGenerateRequest(messages=convo("x"), sampling=sampling)),
        ("StreamGenerate", auto(sampling=sampling)),
        ("CallTools", pb.CallToolsRequest(messages=convo("x"), tools=TOOLS, sampling=sampling)),
    ]


@pytest.mark.parametrize(
    ("field", "sampling"), SAMPLING_BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(SAMPLING_BAD)]
)
async def test_bad_sampling_is_invalid_argument_naming_the_field(
    fake: Fake, field: str, sampling: pb.SamplingParams
) -> None:
    for method, req in _requests(sampling):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            call = getattr(fake.stub, method)(req, timeout=10)
            if method == "StreamGenerate":
                async for _ in call:
                    pass
            else:
                await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert (err.value.details() or "").startswith(f"sampling.{field}:"), method
    assert not fake.engine.requests  # nothing reached the engine


async def test_sampling_at_the_bounds_reaches_the_engine(fake: Fake) -> None:
    sampling = pb.SamplingParams(
        temperature=2.0, top_p=1.0, max_tokens=4096, seed=2**64 - 1, stop=["x" * 64] * 8
    )
    reply = await fake.stub.Generate(
        pb.GenerateRequest(messages=convo("x"), sampling=sampling), timeout=10
    )
    assert reply.text
    params: GenParams = fake.engine.requests[-1][1]
    assert params.temperature == 2.0 and params.top_p == 1.0 and params.seed == 2**64 - 1
    assert params.max_tokens < 4096  # clamped to the room the prompt leaves
    small = await fake.stub.Generate(
        pb.GenerateRequest(messages=convo("x"), sampling=pb.SamplingParams(top_p=0.01)), timeout=10
    )
    assert small.text and fake.engine.requests[-1][1].top_p == pytest.approx(0.01)


# ---- ListLanes dtype ----------------------------------------------------------------------


async def test_list_lanes_reports_the_dtype_chosen_for_the_machine(fake: Fake) -> None:
    lanes = await fake.stub.ListLanes(pb.ListLanesRequest(), timeout=5)
    # The fake starts on a CPU without bf16 flags; the preset says dtype: auto.
    for lane in lanes.lanes:
        assert (lane.dtype, lane.device) == ("float32", "cpu")
        assert lane.dtype_reason.startswith("auto:") and "bf16" in lane.dtype_reason
