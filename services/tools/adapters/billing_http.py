"""Billing over HTTP, for teams whose billing system is an external service.

The wire contract (JSON):

* ``GET  /v1/customers/{customer_id}/billing?limit=N[&invoice_id=...]`` -> overview object
* ``POST /v1/refunds``  body ``{customer_id, invoice_id, amount_cents, reason}``
  -> ``{result, replayed}``; an invoice of another customer is 404 like an unknown one
* ``POST /v1/credits``  body ``{customer_id, amount_cents, reason}`` -> ``{result, replayed}``

Writes carry an ``Idempotency-Key`` header. Errors are ``{"error": {"code", "message"}}``
with 404 (not found), 409 (key reused with other arguments), 422 (precondition failed),
400 (bad request); 5xx and transport failures mean UNAVAILABLE. :mod:`billing_api` serves
this contract from any :class:`BillingStore`.
"""

from __future__ import annotations

from typing import Any

import httpx

from services.tools.adapters.base import JsonDict, WriteOutcome
from shared.errors import (
    AgentmeshError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

IDEMPOTENCY_HEADER = "Idempotency-Key"


class HttpBillingStore:
    """A :class:`BillingStore` that calls the billing API with one pooled httpx client."""

    source = "billing:http"

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    @classmethod
    def create(
        cls, base_url: str, *, timeout_s: float = 5.0, token: str | None = None
    ) -> HttpBillingStore:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return cls(httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers))

    async def close(self) -> None:
        await self._client.aclose()

    async def overview(
        self, customer_id: str, *, invoice_id: str | None = None, limit: int = 6
    ) -> JsonDict:
        params: dict[str, Any] = {"limit": limit}
        if invoice_id:
            params["invoice_id"] = invoice_id
        body = await self._request("GET", f"/v1/customers/{customer_id}/billing", params=params)
        return body

    async def refund(
        self,
        *,
        customer_id: str,
        invoice_id: str,
        amount_cents: int,
        reason: str,
        idempotency_key: str,
    ) -> WriteOutcome:
        body = await self._request(
            "POST",
            "/v1/refunds",
            json={
                "customer_id": customer_id,
                "invoice_id": invoice_id,
                "amount_cents": amount_cents,
                "reason": reason,
            },
            headers={IDEMPOTENCY_HEADER: idempotency_key},
        )
        return WriteOutcome(result=body["result"], replayed=bool(body.get("replayed")))

    async def credit(
        self, *, customer_id: str, amount_cents: int, reason: str, idempotency_key: str
    ) -> WriteOutcome:
        body = await self._request(
            "POST",
            "/v1/credits",
            json={"customer_id": customer_id, "amount_cents": amount_cents, "reason": reason},
            headers={IDEMPOTENCY_HEADER: idempotency_key},
        )
        return WriteOutcome(result=body["result"], replayed=bool(body.get("replayed")))

    async def _request(self, method: str, path: str, **kwargs: Any) -> JsonDict:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded("the billing API did not answer in time") from exc
        except httpx.TransportError as exc:
            raise Unavailable("the billing API is unreachable; try again shortly") from exc
        if response.status_code >= 500:
            raise Unavailable("the billing API is failing; try again shortly")
        try:
            body: JsonDict = response.json()
        except ValueError as exc:
            raise Unavailable("the billing API sent an unreadable answer") from exc
        if response.status_code < 300:
            return body
        raise _error_from(response.status_code, body)


def _error_from(status: int, body: JsonDict) -> AgentmeshError:
    error = body.get("error") if isinstance(body, dict) else None
    message = "the billing API refused the request"
    field = "arguments"
    if isinstance(error, dict):
        message = str(error.get("message") or message)[:300]
        field = str(error.get("field") or field)
    if status == 404:
        return NotFound(message)
    if status == 409:
        return FailedPrecondition(message, reason="IDEMPOTENCY_KEY_REUSED")
    if status == 422:
        return FailedPrecondition(message)
    if status == 400:
        return InvalidArgument(field, message)
    return Unavailable("the billing API answered unexpectedly")
