"""Writes are proposed, never executed in the turn that chose them.

Each money-moving tool has a small named check that reads the session's own records (through
the tools service, on behalf of the bound customer) to

- narrow the schema the model decodes the write under (an invoice id among the customer's
  refundable invoices, an amount no larger than what is refundable and the ceilings), so the
  arguments trace to the records by construction; and
- validate the emitted arguments again and freeze them into an ``Action`` with a one-line
  human summary. A write tool with no check is never proposed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Protocol

from services.orchestrator.loop.policy import ActionPolicy
from services.orchestrator.loop.types import Action, ToolDef

RecordReader = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]
"""(read tool, arguments) -> the tool's JSON result for the bound customer, None if it failed."""


def to_cents(amount: Any) -> int:
    try:
        value = Decimal(str(amount))
    except ArithmeticError:
        return 0
    return int((value * 100).quantize(Decimal("1"), rounding=ROUND_HALF_UP))


def money(cents: int) -> str:
    return f"{cents / 100:.2f}"


@dataclass(frozen=True)
class Declined:
    """Why a write could not be proposed (said to the user)."""

    reason: str


@dataclass(frozen=True)
class Proposal:
    amount_cents: int
    currency: str
    summary: str


@dataclass(frozen=True)
class Limits:
    policy: ActionPolicy
    committed_cents: int  # the session's executed / executing actions

    @property
    def per_action_cents(self) -> int:
        return to_cents(self.policy.max_amount_per_action)

    @property
    def session_left_cents(self) -> int:
        return max(0, to_cents(self.policy.max_amount_per_session) - self.committed_cents)

    def ceiling_cents(self) -> int:
        return min(self.per_action_cents, self.session_left_cents)

    def check(self, amount_cents: int) -> Declined | None:
        if amount_cents <= 0:
            return Declined("the amount must be positive")
        if amount_cents > self.per_action_cents:
            return Declined(
                f"{money(amount_cents)} is above the per-action limit of "
                f"{money(self.per_action_cents)}"
            )
        if amount_cents > self.session_left_cents:
            return Declined(
                f"{money(amount_cents)} is above what this conversation may still move "
                f"({money(self.session_left_cents)})"
            )
        return None


class WriteCheck(Protocol):
    async def narrow(
        self, tool: ToolDef, read: RecordReader, limits: Limits
    ) -> ToolDef | Declined: ...

    async def propose(
        self, args: dict[str, Any], read: RecordReader, limits: Limits
    ) -> Proposal | Declined: ...


def _refundable(invoice: Mapping[str, Any]) -> int:
    paid = sum(
        to_cents(p.get("amount", 0))
        for p in invoice.get("payments", [])
        if isinstance(p, dict) and p.get("status") == "succeeded"
    )
    return max(0, paid - to_cents(invoice.get("refunded", 0)))


class RefundCheck:
    """billing_refund: an invoice of the bound customer, at most what was paid and not yet
    refunded, within the money ceilings."""

    async def narrow(self, tool: ToolDef, read: RecordReader, limits: Limits) -> ToolDef | Declined:
        billing = await read("billing_lookup", {})
        if billing is None:
            return Declined("the billing records could not be read")
        invoices = {
            str(inv["invoice_id"]): _refundable(inv)
            for inv in billing.get("invoices", [])
            if isinstance(inv, dict) and inv.get("invoice_id") and _refundable(inv) > 0
        }
        if not invoices:
            return Declined("no invoice on this account has a refundable payment")
        top = min(max(invoices.values()), limits.ceiling_cents())
        if top <= 0:
            return Declined("this conversation's refund limit is used up")
        schema = tool.schema
        props = dict(schema.get("properties", {}))
        props["invoice_id"] = {"type": "string", "enum": sorted(invoices)}
        props["amount"] = {**dict(props.get("amount", {})), "maximum": top / 100}
        _short_reason(props)
        schema["properties"] = props
        return tool.with_schema(schema)

    async def propose(
        self, args: dict[str, Any], read: RecordReader, limits: Limits
    ) -> Proposal | Declined:
        invoice_id = str(args.get("invoice_id", ""))
        billing = await read("billing_lookup", {"invoice_id": invoice_id})
        found = [
            inv
            for inv in (billing or {}).get("invoices", [])
            if isinstance(inv, dict) and inv.get("invoice_id") == invoice_id
        ]
        if not found:
            return Declined(f"invoice {invoice_id} is not on this account")
        invoice = found[0]
        amount = to_cents(args.get("amount", 0))
        refundable = _refundable(invoice)
        if amount > refundable:
            return Declined(
                f"{money(amount)} is more than the {money(refundable)} refundable on {invoice_id}"
            )
        declined = limits.check(amount)
        if declined is not None:
            return declined
        currency = str(invoice.get("currency", ""))
        reason = str(args.get("reason", "")).strip()
        return Proposal(
            amount_cents=amount,
            currency=currency,
            summary=f"Refund {money(amount)} {currency} on {invoice_id}: {reason}".strip(": "),
        )


class CreditCheck:
    """billing_credit: account credit for the bound customer within the money ceilings."""

    async def narrow(self, tool: ToolDef, read: RecordReader, limits: Limits) -> ToolDef | Declined:
        top = limits.ceiling_cents()
        if top <= 0:
            return Declined("this conversation's credit limit is used up")
        schema = tool.schema
        props = dict(schema.get("properties", {}))
        amount = dict(props.get("amount", {}))
        amount["maximum"] = min(float(amount.get("maximum", top / 100)), top / 100)
        props["amount"] = amount
        _short_reason(props)
        schema["properties"] = props
        return tool.with_schema(schema)

    async def propose(
        self, args: dict[str, Any], read: RecordReader, limits: Limits
    ) -> Proposal | Declined:
        amount = to_cents(args.get("amount", 0))
        declined = limits.check(amount)
        if declined is not None:
            return declined
        billing = await read("billing_lookup", {"limit": 1})
        currency = str((billing or {}).get("currency", ""))
        reason = str(args.get("reason", "")).strip()
        return Proposal(
            amount_cents=amount,
            currency=currency,
            summary=f"Credit {money(amount)} {currency} to the account: {reason}".strip(": "),
        )


REASON_MAX_CHARS = 80


def _short_reason(props: dict[str, Any]) -> None:
    """A reason short enough for one line of the summary (and for the call's token budget)."""
    if "reason" in props:
        reason = dict(props["reason"])
        reason["maxLength"] = min(int(reason.get("maxLength", REASON_MAX_CHARS)), REASON_MAX_CHARS)
        props["reason"] = reason


def default_write_checks() -> dict[str, WriteCheck]:
    """The checks of the reference registry's write tools, by tool name."""
    return {"billing_refund": RefundCheck(), "billing_credit": CreditCheck()}


def new_action(
    *,
    session_id: str,
    turn_index: int,
    tool: str,
    arguments_json: str,
    proposal: Proposal,
    policy: ActionPolicy,
    now: float | None = None,
) -> Action:
    created = time.time() if now is None else now
    return Action(
        action_id="act_" + uuid.uuid4().hex[:20],
        session_id=session_id,
        tool=tool,
        arguments_json=arguments_json,
        summary=proposal.summary,
        amount_cents=proposal.amount_cents,
        currency=proposal.currency,
        turn_index=turn_index,
        created_at=created,
        expires_at=created + policy.expires_after_s,
    )


def parse_args(arguments_json: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments_json or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
