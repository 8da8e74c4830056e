"""Finished tool calls are recorded durably as they finish, and a resumed attempt of the same
turn (same request id) reuses them instead of running them again.

:class:`RecordedTools` wraps the tools port the turn loop uses. The agent opens a
:class:`TurnScope` around a turn run under a request id; inside it each call is keyed by the
turn's identity and the call's own (tool, canonical arguments, how many identical calls came
before it in the turn), never by the model's call id, which a rerun draws anew. Only calls that
finished OK and carry no idempotency key (reads; writes are stored actions with their own key)
are recorded; a failed one runs again on resume.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from services.orchestrator.loop.ports import ToolsPort
from services.orchestrator.loop.types import (
    Principal,
    ToolDef,
    ToolInvocation,
    ToolOutcome,
    canonical_args,
)
from services.orchestrator.sessions.base import SessionStore


@dataclass
class TurnScope:
    """One turn's record of finished calls: what the store held when it (re)started, and the
    occurrences of each call seen so far in this attempt."""

    session_id: str
    request_id: str
    token: int
    recorded: dict[str, str]
    seen: Counter[str] = field(default_factory=Counter)

    def key_of(self, invocation: ToolInvocation) -> str:
        identity = f"{invocation.name}\n{canonical_args(invocation.arguments_json)}"
        occurrence = self.seen[identity]
        self.seen[identity] += 1
        digest = hashlib.sha256(f"{self.request_id}\n{identity}\n{occurrence}".encode())
        return digest.hexdigest()[:32]


def _encode(outcome: ToolOutcome) -> str:
    return json.dumps(dataclasses.asdict(outcome), separators=(",", ":"))


def _decode(raw: str, call_id: str) -> ToolOutcome:
    outcome = ToolOutcome(**json.loads(raw))
    return dataclasses.replace(outcome, call_id=call_id, latency_s=0.0)


class RecordedTools:
    """A :class:`ToolsPort` that records finished calls of the current turn scope."""

    def __init__(self, inner: ToolsPort, store: SessionStore) -> None:
        self._inner = inner
        self._store = store
        self._scope: contextvars.ContextVar[TurnScope | None] = contextvars.ContextVar(
            "agentmesh_turn_scope", default=None
        )

    @contextlib.contextmanager
    def scope(self, scope: TurnScope) -> Iterator[None]:
        reset = self._scope.set(scope)
        try:
            yield
        finally:
            self._scope.reset(reset)

    async def list_tools(self, *, timeout_s: float) -> list[ToolDef]:
        return await self._inner.list_tools(timeout_s=timeout_s)

    async def execute(
        self,
        invocations: Sequence[ToolInvocation],
        *,
        principal: Principal,
        timeout_s: float,
    ) -> list[ToolOutcome]:
        scope = self._scope.get()
        if scope is None:
            return await self._inner.execute(invocations, principal=principal, timeout_s=timeout_s)
        keys = [scope.key_of(inv) for inv in invocations]
        reused = {
            i: _decode(scope.recorded[key], inv.call_id)
            for i, (inv, key) in enumerate(zip(invocations, keys, strict=True))
            if key in scope.recorded and not inv.idempotency_key
        }
        todo = [i for i in range(len(invocations)) if i not in reused]
        fresh = (
            await self._inner.execute(
                [invocations[i] for i in todo], principal=principal, timeout_s=timeout_s
            )
            if todo
            else []
        )
        outcomes = dict(reused)
        finished: dict[str, str] = {}
        for i, outcome in zip(todo, fresh, strict=True):
            outcomes[i] = outcome
            if outcome.ok and not invocations[i].idempotency_key:
                finished[keys[i]] = _encode(outcome)
        if finished:
            await self._store.record_tool_results(
                scope.session_id, scope.request_id, finished, token=scope.token
            )
            scope.recorded.update(finished)
        return [outcomes[i] for i in range(len(invocations))]
