"""A ToolsPort that answers from a turn record: replay is deterministic and runs no tool."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from services.orchestrator.loop.types import (
    Principal,
    ToolDef,
    ToolInvocation,
    ToolOutcome,
    canonical_args,
)
from services.orchestrator.replay.records import RecordedCall

NO_RECORD = json.dumps({"error": "no result was recorded for this call"})


def _canonical(arguments: dict[str, Any]) -> str:
    return canonical_args(json.dumps(arguments))


class RecordedTools:
    """Results by tool name + canonical arguments, else the first unused one by name, else
    NOT_FOUND (the replayed model asked for something the recorded turn never did)."""

    def __init__(self, calls: Sequence[RecordedCall], registry: Sequence[ToolDef] = ()) -> None:
        self._registry = list(registry)
        self._exact: dict[tuple[str, str], RecordedCall] = {}
        self._by_name: dict[str, list[RecordedCall]] = {}
        for call in calls:
            if not call.result_json and call.status not in ("", "OK"):
                continue
            self._exact.setdefault((call.name, _canonical(call.arguments)), call)
            self._by_name.setdefault(call.name, []).append(call)
        self.invocations: list[ToolInvocation] = []

    async def list_tools(self, *, timeout_s: float) -> list[ToolDef]:
        return list(self._registry)

    async def execute(
        self,
        invocations: Sequence[ToolInvocation],
        *,
        principal: Principal,
        timeout_s: float,
    ) -> list[ToolOutcome]:
        out = []
        for inv in invocations:
            self.invocations.append(inv)
            key = (inv.name, canonical_args(inv.arguments_json))
            hit = self._exact.get(key)
            if hit is None:
                named = self._by_name.get(inv.name) or []
                hit = named[0] if named else None
            if hit is None:
                out.append(ToolOutcome(inv.call_id, inv.name, "NOT_FOUND", NO_RECORD, NO_RECORD))
                continue
            status = hit.status if hit.status and hit.status != "PROPOSED" else "OK"
            out.append(
                ToolOutcome(
                    inv.call_id,
                    inv.name,
                    status,
                    "" if status == "OK" else "recorded failure",
                    hit.result_json or "{}",
                    source="replay",
                )
            )
        return out
