"""Fake downstream gRPC services (inference, tools) served through the real shared bootstrap,
so the orchestrator is tested over real channels with health, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from agentmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry

from services.orchestrator.clients import tool_to_proto
from shared.config import ServiceSettings
from shared.errors import ResourceExhausted
from shared.health import HealthReporter
from shared.server import GrpcServer
from tests.orchestrator.fakes import DEFAULT_ARGS, LADDER, REGISTRY

READS = ["crm_lookup", "kb_search", "billing_lookup"]


def _ms(ms: int) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromMilliseconds(ms)
    return value


class FakeInferenceServicer(inference_pb2_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """Plans three reads in round 1 and is done afterwards; composes a fixed answer."""

    def __init__(self, answer: str = "Your invoice INV-00012 was charged twice.") -> None:
        self.answer = answer
        self.requests: list[tuple[str, Any, float | None]] = []
        self.compose_gate: asyncio.Event | None = None
        self.compose_started = asyncio.Event()
        self.compose_cancelled = asyncio.Event()
        # CallTools answers RESOURCE_EXHAUSTED (a full lane, with a retry hint) this many times.
        self.full_lane_refusals = 0

    def _lane(self, selector: inference_pb2.LaneSelector) -> inference_pb2.LaneChoice:
        name = selector.lane or LADDER[min(selector.escalation_level, 2)]
        return inference_pb2.LaneChoice(lane=name, model="fake-135m", reason="fake")

    def _record(self, kind: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.requests.append((kind, request, context.time_remaining()))

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.GenerateResponse:
        self._record("plan", request, context)
        first = "Plan step 1." in request.messages[-1].content
        plan = {"tools": READS if first else [], "done": not first, "reasoning": "look it up"}
        return inference_pb2.GenerateResponse(
            text=json.dumps(plan),
            usage=common_pb2.Usage(
                prompt_tokens=300, completion_tokens=20, cached_prompt_tokens=250
            ),
            finish_reason=inference_pb2.FINISH_REASON_STOP,
            lane=self._lane(request.lane),
            time_to_first_token=_ms(5),
            elapsed=_ms(10),
        )

    async def CallTools(
        self, request: inference_pb2.CallToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.CallToolsResponse:
        self._record("call_tools", request, context)
        if self.full_lane_refusals > 0:
            self.full_lane_refusals -= 1
            raise ResourceExhausted("lane workhorse is at capacity", retry_after_s=0.05)
        calls = [
            inference_pb2.EmittedToolCall(
                call=common_pb2.ToolCall(
                    id=f"call_{i}", name=name, arguments_json=json.dumps(DEFAULT_ARGS[name])
                ),
                outcome=inference_pb2.PARSE_OUTCOME_OK,
            )
            for i, name in enumerate(request.tool_choice.names)
        ]
        return inference_pb2.CallToolsResponse(
            calls=calls,
            usage=common_pb2.Usage(prompt_tokens=900, completion_tokens=60),
            lane=self._lane(request.lane),
            generations=len(calls) + 1,
            elapsed=_ms(10),
        )

    async def StreamGenerate(
        self,
        request: inference_pb2.StreamGenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inference_pb2.StreamGenerateResponse]:
        self._record("compose", request, context)
        self.compose_started.set()
        try:
            for i, word in enumerate(self.answer.split(" ")):
                yield inference_pb2.StreamGenerateResponse(
                    text_delta=word if i == 0 else " " + word
                )
                if i == 0 and self.compose_gate is not None:
                    await self.compose_gate.wait()
            yield inference_pb2.StreamGenerateResponse(
                summary=inference_pb2.GenerationSummary(
                    usage=common_pb2.Usage(prompt_tokens=1200, completion_tokens=9),
                    finish_reason=inference_pb2.FINISH_REASON_STOP,
                    lane=self._lane(request.lane),
                    time_to_first_token=_ms(7),
                    elapsed=_ms(20),
                )
            )
        except asyncio.CancelledError:
            self.compose_cancelled.set()
            raise

    async def ListLanes(
        self, request: inference_pb2.ListLanesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.ListLanesResponse:
        return inference_pb2.ListLanesResponse(preset="fake")

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.requests]


class FakeToolServicer(tools_pb2_grpc.ToolServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.invocations: list[tools_pb2.ToolInvocation] = []

    async def ListTools(
        self, request: tools_pb2.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools_pb2.ListToolsResponse:
        return tools_pb2.ListToolsResponse(
            tools=[tool_to_proto(t) for t in REGISTRY], registry_version="fake"
        )

    async def ExecuteTools(
        self, request: tools_pb2.ExecuteToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tools_pb2.ExecuteToolsResponse:
        self.invocations.extend(request.invocations)
        results = []
        for inv in request.invocations:
            body = json.dumps({"tool": inv.name, "ok": True})
            results.append(
                tools_pb2.ToolResult(
                    call_id=inv.call_id,
                    name=inv.name,
                    status=tools_pb2.TOOL_RESULT_STATUS_OK,
                    result_json=body,
                    fenced_result=f'<tool_result source="fake">{body}</tool_result>',
                    latency=_ms(3),
                    source="fake",
                )
            )
        return tools_pb2.ExecuteToolsResponse(results=results)


@dataclass
class FakeService:
    """A shared.server Service around one fake servicer."""

    name: str
    service_names: Sequence[str]
    servicer: Any
    adder: Any
    metrics_registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def register(self, server: grpc.aio.Server) -> None:
        self.adder(self.servicer, server)

    async def warm_up(self, health: HealthReporter) -> None:
        return None

    async def close(self) -> None:
        return None


async def start_fake(kind: str) -> tuple[GrpcServer, Any]:
    if kind == "inference":
        servicer: Any = FakeInferenceServicer()
        service = FakeService(
            "inference",
            ["agentmesh.inference.v1.InferenceService"],
            servicer,
            inference_pb2_grpc.add_InferenceServiceServicer_to_server,
        )
    else:
        servicer = FakeToolServicer()
        service = FakeService(
            "tools",
            ["agentmesh.tools.v1.ToolService"],
            servicer,
            tools_pb2_grpc.add_ToolServiceServicer_to_server,
        )
    server = GrpcServer(service, ServiceSettings(port=0, metrics_port=0, grace_seconds=1))
    await server.start()
    await server.wait_until_serving(10)
    return server, servicer
