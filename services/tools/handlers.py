"""The tool handlers: validated arguments in, adapter calls out.

Bound to the adapters they use (constructor injection), so tests swap in fakes and
deployments swap backends without touching the registry. Principal-bound arguments (the
``customer_id`` of CRM and billing tools) arrive already filled and checked by the executor.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from services.tools.adapters.base import BillingStore, CrmStore, KnowledgeBaseSearch
from services.tools.executor import CallContext, ToolHandler, ToolOutput
from shared.errors import InvalidArgument


def to_cents(amount: float | int, field: str = "amount") -> int:
    """Currency units (as the model writes them) to integer cents; at most 2 decimals."""
    value = Decimal(str(amount))
    cents = (value * 100).quantize(Decimal("1"), rounding=ROUND_HALF_UP)
    if cents != value * 100:
        raise InvalidArgument(field, "must have at most two decimals")
    if cents <= 0:
        raise InvalidArgument(field, "must be positive")
    return int(cents)


class Toolbox:
    """One handler per registry tool, over a CRM, a knowledge base and a billing store."""

    def __init__(self, crm: CrmStore, kb: KnowledgeBaseSearch, billing: BillingStore) -> None:
        self._crm = crm
        self._kb = kb
        self._billing = billing

    def handlers(self) -> dict[str, ToolHandler]:
        return {
            "crm_lookup": self.crm_lookup,
            "crm_find_customer": self.crm_find_customer,
            "kb_search": self.kb_search,
            "billing_lookup": self.billing_lookup,
            "billing_refund": self.billing_refund,
            "billing_credit": self.billing_credit,
        }

    def sources(self) -> dict[str, str]:
        return {
            "crm_lookup": self._crm.source,
            "crm_find_customer": self._crm.source,
            "kb_search": self._kb.source,
            "billing_lookup": self._billing.source,
            "billing_refund": self._billing.source,
            "billing_credit": self._billing.source,
        }

    async def crm_lookup(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        data = await self._crm.lookup(str(args["customer_id"]))
        return ToolOutput(data, self._crm.source)

    async def crm_find_customer(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        # A bound principal only ever finds itself; an anonymous one (where the deployment
        # registered this tool at all) finds whoever owns the e-mail.
        data = await self._crm.find_by_email(
            str(args["email"]), customer_id=ctx.principal.customer_id
        )
        return ToolOutput(data, self._crm.source)

    async def kb_search(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        data = await self._kb.search(str(args["query"]), int(args.get("top_k", 3)))
        return ToolOutput(data, self._kb.source)

    async def billing_lookup(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        data = await self._billing.overview(
            str(args["customer_id"]),
            invoice_id=args.get("invoice_id"),
            limit=int(args.get("limit", 6)),
        )
        return ToolOutput(data, self._billing.source)

    async def billing_refund(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        outcome = await self._billing.refund(
            customer_id=str(args["customer_id"]),
            invoice_id=str(args["invoice_id"]),
            amount_cents=to_cents(args["amount"]),
            reason=str(args["reason"]),
            idempotency_key=ctx.idempotency_key,
        )
        return ToolOutput(outcome.result, self._billing.source, replayed=outcome.replayed)

    async def billing_credit(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        outcome = await self._billing.credit(
            customer_id=str(args["customer_id"]),
            amount_cents=to_cents(args["amount"]),
            reason=str(args["reason"]),
            idempotency_key=ctx.idempotency_key,
        )
        return ToolOutput(outcome.result, self._billing.source, replayed=outcome.replayed)
