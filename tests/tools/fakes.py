"""Fakes for the tool service tests (fakes over mocks: they behave, they don't record)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from services.tools.adapters.base import JsonDict, WriteOutcome
from services.tools.adapters.kb import Vector, tokenize
from shared.errors import Unavailable


class HashEmbedder:
    """Bag-of-words hashed into 256 dimensions: deterministic, instant, no model.

    Texts sharing words get similar vectors, which is enough to test the index plumbing
    (persistence, reload, qdrant parity, blending) without the real model.
    """

    name = "hash-bow-256"
    dim = 256

    def __init__(self) -> None:
        self.embedded_texts = 0

    async def embed(self, texts: Sequence[str]) -> Vector:
        self.embedded_texts += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in tokenize(text):
                slot = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest())
                out[row, slot % self.dim] += 1.0
            norm = float(np.linalg.norm(out[row]))
            if norm > 0:
                out[row] /= norm
        return out


class GatedCrm:
    """A CRM that waits at a shared barrier: it only returns if the others run meanwhile."""

    source = "crm:fake"

    def __init__(self, barrier: asyncio.Barrier) -> None:
        self._barrier = barrier

    async def lookup(self, customer_id: str) -> JsonDict:
        await self._barrier.wait()
        return {"customer": {"customer_id": customer_id, "name": "Ada"}}

    async def find_by_email(self, email: str, *, customer_id: str | None = None) -> JsonDict:
        await self._barrier.wait()
        return {"customer": {"customer_id": customer_id or "CUST-0001", "email": email}}


class GatedKb:
    source = "kb:fake"

    def __init__(self, barrier: asyncio.Barrier, *, hang: bool = False) -> None:
        self._barrier = barrier
        self._hang = hang

    async def search(self, query: str, top_k: int = 3) -> JsonDict:
        if self._hang:
            await asyncio.Event().wait()  # never answers: the call's deadline must end it
        await self._barrier.wait()
        return {"query": query, "results": [{"article_id": "KB-1", "title": "t", "score": 1.0}]}


class GatedBilling:
    source = "billing:fake"

    def __init__(self, barrier: asyncio.Barrier, *, down: bool = False) -> None:
        self._barrier = barrier
        self._down = down

    async def overview(
        self, customer_id: str, *, invoice_id: str | None = None, limit: int = 6
    ) -> JsonDict:
        if self._down:
            raise Unavailable("the billing store is unavailable; try again shortly")
        await self._barrier.wait()
        return {"customer_id": customer_id, "invoices": []}

    async def refund(self, **kwargs: Any) -> WriteOutcome:
        raise Unavailable("the billing store is unavailable; try again shortly")

    async def credit(self, **kwargs: Any) -> WriteOutcome:
        raise Unavailable("the billing store is unavailable; try again shortly")
