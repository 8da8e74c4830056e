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

    async def lookup(self, customer_id: str) -> JsonDict:
        """The customer's profile; NotFound when there is no such customer."""
        ...

    async def find_by_email(self, email: str, *, customer_id: str | None = None) -> JsonDict:
        """The profile of the customer with ``email`` (any case). With ``customer_id`` only
        that customer can match: another customer's e-mail is NotFound, in the same words
        as an unknown one."""
        ...


class BillingStore(Protocol):
    source: str

    async def overview(
        self, customer_id: str, *, invoice_id: str | None = None, limit: int = 6
    ) -> JsonDict: ...

    async def refund(
        self,
        *,
        customer_id: str,
        invoice_id: str,
        amount_cents: int,
        reason: str,
        idempotency_key: str,
    ) -> WriteOutcome:
        """Refund an invoice of ``customer_id``; another customer's invoice is NotFound, in
        the same words as an unknown one."""
        ...

    async def credit(
        self, *, customer_id: str, amount_cents: int, reason: str, idempotency_key: str
    ) -> WriteOutcome: ...


class KnowledgeBaseSearch(Protocol):
    source: str

    async def search(self, query: str, top_k: int = 3) -> JsonDict: ...
