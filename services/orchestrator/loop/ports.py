"""The ports the turn loop talks through. gRPC adapters implement them in production
(services/orchestrator/clients.py); tests pass in-process fakes.

Every method takes ``timeout_s``: the seconds left for that call (turn budget ∩ task budget ∩
the caller's RPC deadline, minus a margin). Errors are shared.errors domain errors
(Unavailable, DeadlineExceeded, InvalidArgument, ResourceExhausted, ...). Cancelling the
awaiting task must cancel the downstream work (the engine generation, the tool calls).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from services.orchestrator.loop.types import (
    CallToolsResult,
    ComposeDelta,
    ComposeDone,
    Decoding,
    GenerateResult,
    LaneRequest,
    Message,
    Principal,
    TokenCount,
    ToolCallsChosen,
    ToolDef,
    ToolInvocation,
    ToolOutcome,
)

AnswerItem = ComposeDelta | ToolCallsChosen | ComposeDone


class InferencePort(Protocol):
    async def plan(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        json_schema: str,
        max_tokens: int,
        timeout_s: float,
    ) -> GenerateResult:
        """One non-streamed generation whose output matches ``json_schema``."""
        ...

    async def emit_tool_calls(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        names: Sequence[str],
        lane: LaneRequest,
        *,
        parallel: bool,
        decoding: Decoding,
        max_tokens: int | None,
        timeout_s: float,
    ) -> CallToolsResult:
        """One call per tool in ``names`` (tool choice NAMED); ``parallel``: one generation
        per tool, submitted together, else one generation for all of them."""
        ...

    def answer(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        tool_choice: str,
        max_calls: int,
        max_tokens: int,
        timeout_s: float,
    ) -> AsyncGenerator[AnswerItem, None]:
        """Continue or answer, in the lane's native function-calling format: text deltas as
        generated, or one ToolCallsChosen; then exactly one ComposeDone. ``tool_choice``:
        "none" (text only), "auto" (text or calls) or "required" (calls)."""
        ...

    async def count_tokens(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolDef],
        lane: LaneRequest,
        *,
        texts: Sequence[str] = (),
        truncate_to: int = 0,
        timeout_s: float,
    ) -> TokenCount:
        """Token counts in the lane's tokenizer (no engine work)."""
        ...


class ToolsPort(Protocol):
    async def list_tools(self, *, timeout_s: float) -> list[ToolDef]: ...

    async def execute(
        self,
        invocations: Sequence[ToolInvocation],
        *,
        principal: Principal,
        timeout_s: float,
    ) -> list[ToolOutcome]:
        """Runs the batch concurrently on behalf of ``principal`` (the tools service
        enforces it); results in invocation order, one per call."""
        ...
