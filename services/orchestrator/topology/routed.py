"""RoutedInference: the loop's InferencePort over a LaneDirectory.

Per call:

1. **Lane**: the request's named lane (a forced lane), else the profile's ladder rung for its
   escalation level. The lane goes downstream by name, so whichever deployment hosts it
   serves it (its own router never has to guess).
2. **Replica**: the pool's live endpoints ranked by rendezvous hash of (session, lane); the
   first with room serves. A session's calls land on one replica and reuse its prefix cache;
   they move only when that replica leaves (dead, drained, removed from DNS) or is full.
3. **Replica failover**: UNAVAILABLE marks the endpoint down and the next one is tried; an
   admission refusal (RESOURCE_EXHAUSTED, after the client's own retry on its hint) skips it.
4. **Lane failover**: when no replica of the lane answers and the lane was chosen by the
   ladder, the next rung serves; the reason travels in ``GenerationStats.route_notes`` and
   becomes a turn note. A forced lane does not fail over (the caller asked for that lane).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

from services.orchestrator.clients import GrpcInference
from services.orchestrator.loop.types import (
    CallToolsResult,
    ComposeDelta,
    ComposeDone,
    Decoding,
    GenerateResult,
    LaneRequest,
    Message,
    TokenCount,
    ToolCallsChosen,
    ToolDef,
)
from services.orchestrator.topology.directory import Endpoint, LaneDirectory
from services.orchestrator.topology.rendezvous import affinity_key
from shared.deadlines import Deadline
from shared.errors import DeadlineExceeded, NotFound, ResourceExhausted, Unavailable

T = TypeVar("T")
H = TypeVar("H", GenerateResult, CallToolsResult, ComposeDone)
AnswerItem = ComposeDelta | ToolCallsChosen | ComposeDone
Op = Callable[[GrpcInference, LaneRequest, float], Awaitable[T]]


class RoutedInference:
    """InferencePort routing each call to a replica of the deployment hosting its lane."""

    def __init__(self, directory: LaneDirectory, ladder: Sequence[str]) -> None:
        self._directory = directory
        self._ladder = list(ladder)
        # Endpoint address -> calls it served (tests and logs read it).
        self.served: dict[str, int] = {}

    # ------------------------------------------------------------------ lane choice

    def resolve(self, lane: LaneRequest) -> str:
        """The lane name a request goes to (before any failover)."""
        if lane.lane:
            return lane.lane
        if not self._ladder:
            raise NotFound("no lane ladder is configured to route automatic requests")
        return self._ladder[min(lane.escalation_level, len(self._ladder) - 1)]

    def _next_rung(self, lane: LaneRequest, current: str) -> str | None:
        if lane.lane or current not in self._ladder:
            return None
        index = self._ladder.index(current) + 1
        return self._ladder[index] if index < len(self._ladder) else None

    def _attempts(self, lane: LaneRequest) -> list[tuple[str, LaneRequest]]:
        """(lane name, explicit request) per rung this call may use, in order."""
        out = []
        name: str | None = self.resolve(lane)
        while name is not None:
            out.append((name, dataclasses.replace(lane, lane=name)))
            name = self._next_rung(lane, name)
        return out

    # ------------------------------------------------------------------ the call loop

    async def _route(
        self, lane: LaneRequest, timeout_s: float, op: Op[T]
    ) -> tuple[T, tuple[str, ...]]:
        deadline = Deadline.after(timeout_s)
        notes: list[str] = []
        attempts = self._attempts(lane)
        for rung, (name, request) in enumerate(attempts):
            full: ResourceExhausted | None = None
            tried: list[str] = []
            for endpoint in self._directory.candidates(name, affinity_key(lane.session_id, name)):
                remaining = deadline.time_remaining()
                if remaining <= 0:
                    raise DeadlineExceeded("the inference call ran out of time while routing")
                endpoint.begin(name)
                try:
                    result = await op(endpoint.client, request, remaining)
                except Unavailable:
                    self._directory.mark_down(endpoint, "UNAVAILABLE")
                    tried.append(f"{endpoint.address} unavailable")
                    continue
                except ResourceExhausted as exc:
                    self._directory.mark_full(endpoint, name, exc.retry_after_s)
                    full = exc
                    tried.append(f"{endpoint.address} full")
                    continue
                except NotFound:
                    self._directory.mark_not_hosting(endpoint, name)
                    tried.append(f"{endpoint.address} does not host it")
                    continue
                finally:
                    endpoint.end(name)
                self._served(endpoint)
                return result, tuple(notes)
            if full is not None:
                # Busy, not down: the caller's capacity handling applies, no failover.
                raise full
            why = "; ".join(tried) or "no live replica: " + (
                ", ".join(self._directory.describe().get(name, [])) or "no pool configured"
            )
            if rung + 1 < len(attempts):
                why += f"; failed over to {attempts[rung + 1][0]}"
            notes.append(f"lane {name} was unavailable ({why})")
        raise Unavailable(
            f"no inference deployment can serve lane {self.resolve(lane)!r}: " + "; ".join(notes)
        )

    def _served(self, endpoint: Endpoint) -> None:
        self.served[endpoint.address] = self.served.get(endpoint.address, 0) + 1

    @staticmethod
    def _noted(holder: H, notes: tuple[str, ...]) -> H:
        """``holder`` with the failover notes added to its stats."""
        if not notes:
            return holder
        stats = dataclasses.replace(holder.stats, route_notes=(*holder.stats.route_notes, *notes))
        return dataclasses.replace(holder, stats=stats)

    # ------------------------------------------------------------------ the port

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
        result, notes = await self._route(
            lane,
            timeout_s,
            lambda client, request, t: client.plan(
                messages,
                tools,
                request,
                json_schema=json_schema,
                max_tokens=max_tokens,
                timeout_s=t,
            ),
        )
        return self._noted(result, notes)

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
        result, notes = await self._route(
            lane,
            timeout_s,
            lambda client, request, t: client.emit_tool_calls(
                messages,
                tools,
                names,
                request,
                parallel=parallel,
                decoding=decoding,
                max_tokens=max_tokens,
                timeout_s=t,
            ),
        )
        return self._noted(result, notes)

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
        result, _ = await self._route(
            lane,
            timeout_s,
            lambda client, request, t: client.count_tokens(
                messages, tools, request, texts=texts, truncate_to=truncate_to, timeout_s=t
            ),
        )
        return result

    async def answer(
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
        """The stream of the first replica that produces its first item; a replica that dies
        before that is skipped like a unary call's, one that dies after it ends the stream
        with its error (the user already saw part of the answer)."""

        async def first(
            client: GrpcInference, request: LaneRequest, t: float
        ) -> tuple[AsyncGenerator[AnswerItem, None], AnswerItem | None]:
            stream = client.answer(
                messages,
                tools,
                request,
                tool_choice=tool_choice,
                max_calls=max_calls,
                max_tokens=max_tokens,
                timeout_s=t,
            )
            try:
                item = await anext(stream)
            except StopAsyncIteration:
                return stream, None
            except BaseException:
                await stream.aclose()
                raise
            return stream, item

        (stream, item), notes = await self._route(lane, timeout_s, first)
        try:
            while item is not None:
                if isinstance(item, ComposeDone) and notes:
                    item = self._noted(item, notes)
                yield item
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    item = None
        finally:
            await stream.aclose()
