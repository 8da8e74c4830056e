"""A billing HTTP API (aiohttp) serving the contract of :mod:`billing_http`.

Backs the HTTP adapter's tests and local development: it exposes any
:class:`BillingStore` (normally :class:`SqlBillingStore`) over HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.tools.adapters.base import BillingStore
from services.tools.adapters.billing_http import IDEMPOTENCY_HEADER
from shared.errors import (
    AgentmeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

_STORE_KEY = web.AppKey("billing_store", BillingStore)


def _error(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return web.json_response({"error": error}, status=status)


def _from_domain(exc: AgentmeshError) -> web.Response:
    if isinstance(exc, NotFound):
        return _error(404, "NOT_FOUND", exc.message)
    if isinstance(exc, FailedPrecondition):
        status = 409 if exc.reason == "IDEMPOTENCY_KEY_REUSED" else 422
        return _error(status, exc.reason, exc.message)
    if isinstance(exc, InvalidArgument):
        return _error(400, "INVALID_ARGUMENT", exc.description, exc.field)
    if isinstance(exc, Unavailable):
        return _error(503, "UNAVAILABLE", "billing backend unavailable")
    return _error(500, "INTERNAL", "internal error")


@dataclass(frozen=True)
class _WriteBody:
    ids: dict[str, str]
    amount_cents: int
    reason: str
    idempotency_key: str


async def _read_write_body(request: web.Request, *id_fields: str) -> _WriteBody:
    key = request.headers.get(IDEMPOTENCY_HEADER, "").strip()
    if not key:
        raise InvalidArgument("idempotency_key", f"the {IDEMPOTENCY_HEADER} header is required")
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidArgument("body", "not JSON") from exc
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be an object")
    ids: dict[str, str] = {}
    for id_field in id_fields:
        target = body.get(id_field)
        if not isinstance(target, str) or not target:
            raise InvalidArgument(id_field, "required")
        ids[id_field] = target
    amount, reason = body.get("amount_cents"), body.get("reason")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise InvalidArgument("amount_cents", "must be a positive integer")
    if not isinstance(reason, str) or not reason:
        raise InvalidArgument("reason", "required")
    return _WriteBody(ids, amount, reason, key)


async def _overview(request: web.Request) -> web.Response:
    store = request.app[_STORE_KEY]
    try:
        limit = int(request.query.get("limit", "6"))
    except ValueError:
        return _error(400, "INVALID_ARGUMENT", "limit must be an integer", "limit")
    try:
        body = await store.overview(
            request.match_info["customer_id"],
            invoice_id=request.query.get("invoice_id") or None,
            limit=max(1, min(limit, 50)),
        )
    except AgentmeshError as exc:
        return _from_domain(exc)
    return web.json_response(body)


async def _refund(request: web.Request) -> web.Response:
    store = request.app[_STORE_KEY]
    try:
        body = await _read_write_body(request, "customer_id", "invoice_id")
        outcome = await store.refund(
            customer_id=body.ids["customer_id"],
            invoice_id=body.ids["invoice_id"],
            amount_cents=body.amount_cents,
            reason=body.reason,
            idempotency_key=body.idempotency_key,
        )
    except AgentmeshError as exc:
        return _from_domain(exc)
    return web.json_response({"result": outcome.result, "replayed": outcome.replayed})


async def _credit(request: web.Request) -> web.Response:
    store = request.app[_STORE_KEY]
    try:
        body = await _read_write_body(request, "customer_id")
        outcome = await store.credit(
            customer_id=body.ids["customer_id"],
            amount_cents=body.amount_cents,
            reason=body.reason,
            idempotency_key=body.idempotency_key,
        )
    except AgentmeshError as exc:
        return _from_domain(exc)
    return web.json_response({"result": outcome.result, "replayed": outcome.replayed})


def create_app(store: BillingStore) -> web.Application:
    app = web.Application()
    app[_STORE_KEY] = store
    app.router.add_get("/v1/customers/{customer_id}/billing", _overview)
    app.router.add_post("/v1/refunds", _refund)
    app.router.add_post("/v1/credits", _credit)
    return app


@dataclass
class RunningBillingApi:
    runner: web.AppRunner
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_billing_api(
    store: BillingStore, host: str = "127.0.0.1", port: int = 0
) -> RunningBillingApi:
    """Serve ``store`` on ``host:port`` (0: any free port) in the running event loop."""
    runner = web.AppRunner(create_app(store), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    return RunningBillingApi(runner=runner, port=bound)
