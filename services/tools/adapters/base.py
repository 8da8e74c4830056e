"""The small interfaces the tools talk to; each has an embedded and a production backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

JsonDict = dict[str, Any]


@dataclass(frozen=True)
class WriteOutcome:
    """A write's result; ``replayed`` when it came from the idempotency store."""

    result: JsonDict
    replayed: bool


class CrmStore(Protocol):
    source: str

    async def lookup(
        self,
        *,
        customer_id: str | None = None,
        email: str | None = None,
        name: str | None = None,
    ) -> JsonDict: ...


class BillingStore(Protocol):
    source: str

    async def overview(
        self, customer_id: str, *, invoice_id: str | None = None, limit: int = 6
    ) -> JsonDict: ...

    async def refund(
        self, *, invoice_id: str, amount_cents: int, reason: str, idempotency_key: str
    ) -> WriteOutcome: ...

    async def credit(
        self, *, customer_id: str, amount_cents: int, reason: str, idempotency_key: str
    ) -> WriteOutcome: ...


class KnowledgeBaseSearch(Protocol):
    source: str

    async def search(self, query: str, top_k: int = 3) -> JsonDict: ...
