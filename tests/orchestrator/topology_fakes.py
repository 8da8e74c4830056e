"""Fake inference deployments for the topology tests: each hosts some lanes (ListLanes says
which, with in-flight counts), refuses lanes it does not host (NOT_FOUND, like the real
router), can emit invalid tool calls on chosen lanes (to drive escalation), and keeps a
vLLM-style prefix cache so ``cached_prompt_tokens`` is what a replica really would reuse:

the prompt (tools + messages, rendered the same way every call) is cut into 16-token blocks
of the fake tokenizer (4 characters a token); a block is cached when the chain of blocks up
to it was computed on this replica before. Which replica a session lands on decides how much
of its growing history is cached on the next turn.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from shared.errors import NotFound
from shared.server import GrpcServer
from tests.orchestrator.grpc_fakes import (
    CHARS_PER_TOKEN,
    FakeInferenceServicer,
    FakeService,
    serve,
)

BLOCK_TOKENS = 16
CUSTOMER = re.compile(r"about customer (CUST-\d+)")


def render(messages: Sequence[common_pb2.ChatMessage], tools: Sequence[Any]) -> str:
    head = "".join(f"<tool>{t.name}:{t.parameters_json_schema}</tool>" for t in tools)
    body = "".join(f"<{m.role}>{m.content}{list(m.tool_calls)}</{m.role}>" for m in messages)
    return head + body


@dataclass
class PrefixCache:
    """Block hashes of computed prompts, least recently used evicted past ``capacity``."""

    capacity: int = 1_000_000
    blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def serve(self, prompt: str) -> tuple[int, int]:
        """(prompt tokens, cached prompt tokens) of one request; caches its blocks."""
        size = BLOCK_TOKENS * CHARS_PER_TOKEN
        tokens = -(-len(prompt) // CHARS_PER_TOKEN)
        chain = hashlib.blake2b(digest_size=16)
        cached = 0
        hit = True
        for start in range(0, len(prompt) - size + 1, size):
            chain.update(prompt[start : start + size].encode())
            key = chain.digest()
            if hit and key in self.blocks:
                cached += BLOCK_TOKENS
            else:
                hit = False
            self.blocks[key] = None
            self.blocks.move_to_end(key)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return tokens, cached


class LaneFake(FakeInferenceServicer):
    """One fake inference deployment; see the module docstring."""

    def __init__(
        self,
        name: str,
        hosted: Sequence[str],
        max_concurrency: int = 16,
        cache_blocks: int = 1_000_000,
    ) -> None:
        super().__init__()
        self.name = name
        self.hosted = list(hosted)
        self.max_concurrency = max_concurrency
        # ListLanes reports this many in flight per lane on top of the real ones.
        self.reported_in_flight: dict[str, int] = {}
        self.invalid_on: set[str] = set()
        self.cache = PrefixCache(cache_blocks)
        # (customer id, lane, kind) per served call.
        self.served: list[tuple[str, str, str]] = []
        self._in_flight: dict[str, int] = {}

    def _lane(self, selector: inference_pb2.LaneSelector) -> inference_pb2.LaneChoice:
        choice = super()._lane(selector)
        if choice.lane not in self.hosted:
            raise NotFound(f"lane {choice.lane!r} is not hosted here", reason="LANE_NOT_HOSTED")
        return choice

    def _note(self, kind: str, request: Any) -> common_pb2.Usage:
        lane = self._lane(request.lane).lane
        customer = ""
        for m in request.messages:
            found = CUSTOMER.search(m.content)
            if found:
                customer = found.group(1)
        self.served.append((customer, lane, kind))
        prompt, cached = self.cache.serve(render(request.messages, request.tools))
        return common_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=10, cached_prompt_tokens=cached
        )

    def customers(self) -> set[str]:
        return {c for c, _, _ in self.served}

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.GenerateResponse:
        usage = self._note("plan", request)
        response = await super().Generate(request, context)
        response.usage.CopyFrom(usage)
        return response

    async def CallTools(
        self, request: inference_pb2.CallToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.CallToolsResponse:
        usage = self._note("call_tools", request)
        response = await super().CallTools(request, context)
        response.usage.CopyFrom(usage)
        if response.lane.lane in self.invalid_on:
            for call in response.calls:
                call.outcome = inference_pb2.PARSE_OUTCOME_FAILED
                call.parse_error = f"{call.call.name}: arguments do not match the schema"
        return response

    async def StreamGenerate(
        self,
        request: inference_pb2.StreamGenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inference_pb2.StreamGenerateResponse]:
        usage = self._note("answer", request)
        async for response in super().StreamGenerate(request, context):
            if response.HasField("summary"):
                response.summary.usage.CopyFrom(usage)
            yield response

    async def CountTokens(
        self,
        request: inference_pb2.CountTokensRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> inference_pb2.CountTokensResponse:
        self._lane(request.lane)
        return await super().CountTokens(request, context)

    async def ListLanes(
        self, request: inference_pb2.ListLanesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.ListLanesResponse:
        return inference_pb2.ListLanesResponse(
            preset="fake",
            lanes=[
                inference_pb2.LaneInfo(
                    name=lane,
                    model="fake-135m",
                    state=inference_pb2.LANE_STATE_SERVING,
                    max_concurrency=self.max_concurrency,
                    in_flight=self.reported_in_flight.get(lane, 0),
                )
                for lane in self.hosted
            ],
        )


async def start_lane_fake(
    name: str, hosted: Sequence[str], *, cache_blocks: int = 1_000_000
) -> tuple[GrpcServer, LaneFake]:
    servicer = LaneFake(name, hosted, cache_blocks=cache_blocks)
    service = FakeService(
        f"inference-{name}",
        ["agentmesh.inference.v1.InferenceService"],
        servicer,
        inference_pb2_grpc.add_InferenceServiceServicer_to_server,
    )
    return await serve(service), servicer
