"""Generation results and their accounting: token usage, lane metrics, proto conversions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.inference.engine import Delta
from services.inference.tool_calls import ParsedCall, new_call_id

FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return d


@dataclass
class GenResult:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish: str = "stop"
    ttft_s: float = 0.0

    def add(self, delta: Delta, started: float) -> None:
        """Fold one engine delta in (the output text is the caller's: it streams or joins it);
        time to first token counts from `started`."""
        if delta.new_tokens and not self.ttft_s:
            self.ttft_s = time.monotonic() - started
        self.completion_tokens += delta.new_tokens
        if delta.finished:
            self.finish = delta.finish_reason or "stop"
            self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
            self.cached_tokens = delta.cached_tokens

    def usage(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_prompt_tokens=self.cached_tokens,
        )


@dataclass
class Metrics:
    registry: CollectorRegistry
    ttft: Histogram = field(init=False)
    tokens: Counter = field(init=False)
    rejected: Counter = field(init=False)
    calls: Counter = field(init=False)
    itl: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.itl = Histogram(
            "agentmesh_inference_inter_token_latency_seconds",
            "Mean time between output tokens of one generation, after the first.",
            ["lane"],
            buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "agentmesh_inference_ttft_seconds",
            "Time to first token.",
            ["lane"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
            registry=self.registry,
        )
        self.tokens = Counter(
            "agentmesh_inference_tokens",
            "Tokens by lane and kind (prompt, cached, completion).",
            ["lane", "kind"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "agentmesh_inference_rejected",
            "Requests refused at a lane's concurrency cap or its engine's sequence budget.",
            ["lane"],
            registry=self.registry,
        )
        self.calls = Counter(
            "agentmesh_inference_tool_calls",
            "Emitted tool calls by lane and parse outcome.",
            ["lane", "outcome"],
            registry=self.registry,
        )

    def account(self, lane: str, result: GenResult, elapsed_s: float = 0.0) -> None:
        if elapsed_s > result.ttft_s > 0 and result.completion_tokens > 1:
            self.itl.labels(lane).observe(
                (elapsed_s - result.ttft_s) / (result.completion_tokens - 1)
            )
        self.tokens.labels(lane, "prompt").inc(result.prompt_tokens)
        self.tokens.labels(lane, "cached").inc(result.cached_tokens)
        self.tokens.labels(lane, "completion").inc(result.completion_tokens)
        if result.ttft_s:
            self.ttft.labels(lane).observe(result.ttft_s)


def emitted(call: ParsedCall) -> pb.EmittedToolCall:
    return pb.EmittedToolCall(
        call=common_pb2.ToolCall(
            id=call.id or new_call_id(), name=call.name, arguments_json=call.arguments_json
        ),
        outcome=pb.PARSE_OUTCOME_OK if call.ok else pb.PARSE_OUTCOME_FAILED,
        parse_error=call.error,
        raw_text=call.raw_text,
    )
