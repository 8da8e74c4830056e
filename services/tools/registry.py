"""The tool registry: fixed per process.

The orchestrator renders these specs into the system prompt, and the inference engine's
prefix cache is keyed on that prompt, so the registry never changes while a process runs;
a change is a new deployment with a new ``registry_version``.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


class Effect(enum.Enum):
    """READ tools only look; WRITE tools change state and need an idempotency key."""

    READ = "read"
    WRITE = "write"


def canonical_json(value: Any) -> str:
    """Stable compact JSON: the same value always renders to the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ToolDefinition:
    """One tool as the model sees it; ``source_kind`` names the adapter family."""

    name: str
    description: str
    parameters_json: str  # canonical JSON Schema text (frozen: a string cannot be mutated)
    effect: Effect
    timeout_ms: int
    source_kind: str
    # Arguments the caller's principal fills (the model never chooses them), and whether an
    # anonymous principal is refused. See :mod:`services.tools.principal`.
    principal_arguments: tuple[str, ...] = ()
    requires_customer: bool = False

    def __post_init__(self) -> None:
        # Principal-bound arguments are schema properties of a tool that requires a
        # customer: an anonymous principal has nothing to fill them with.
        properties = self.parameters.get("properties", {})
        unknown = [a for a in self.principal_arguments if a not in properties]
        if unknown:
            raise ValueError(f"{self.name}: principal arguments {unknown} are not properties")
        if self.principal_arguments and not self.requires_customer:
            raise ValueError(f"{self.name}: principal-bound arguments need requires_customer")

    @property
    def parameters(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.parameters_json)
        return parsed


def define(
    name: str,
    description: str,
    parameters: Mapping[str, Any],
    *,
    effect: Effect,
    timeout_ms: int,
    source_kind: str,
    principal_arguments: tuple[str, ...] = (),
    requires_customer: bool = False,
) -> ToolDefinition:
    return ToolDefinition(
        name=name,
        description=" ".join(description.split()),
        parameters_json=canonical_json(parameters),
        effect=effect,
        timeout_ms=timeout_ms,
        source_kind=source_kind,
        principal_arguments=tuple(principal_arguments),
        requires_customer=requires_customer,
    )


class Registry:
    """An immutable, ordered set of tool definitions."""

    __slots__ = ("_tools", "_version")
    _tools: Mapping[str, ToolDefinition]
    _version: str

    def __init__(self, tools: tuple[ToolDefinition, ...]) -> None:
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        ordered = tuple(sorted(tools, key=lambda t: t.name))
        object.__setattr__(self, "_tools", MappingProxyType({t.name: t for t in ordered}))
        rendered = canonical_json(
            [
                {
                    "name": t.name,
                    "description": t.description,
                    "parameters": json.loads(t.parameters_json),
                    "effect": t.effect.value,
                    "timeout_ms": t.timeout_ms,
                    "principal_arguments": list(t.principal_arguments),
                    "requires_customer": t.requires_customer,
                }
                for t in ordered
            ]
        )
        version = hashlib.sha256(rendered.encode()).hexdigest()[:16]
        object.__setattr__(self, "_version", version)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the tool registry is immutable")

    @property
    def version(self) -> str:
        return self._version

    def get(self, name: str) -> ToolDefinition | None:
        return self._tools.get(name)

    def __iter__(self) -> Iterator[ToolDefinition]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return list(self._tools)


_CUSTOMER_ID = {"type": "string", "pattern": "^CUST-[0-9]{4,8}$", "description": "e.g. CUST-0042"}
_INVOICE_ID = {"type": "string", "pattern": "^INV-[0-9]{5,8}$"}
_AMOUNT = {
    "type": "number",
    "exclusiveMinimum": 0,
    "maximum": 100000,
    "description": "In the invoice's currency units, e.g. 49.00",
}
_REASON = {"type": "string", "minLength": 3, "maxLength": 500}
# The signed-in customer's own id: filled from the principal, never chosen by the model.
_BOUND_CUSTOMER = ("customer_id",)

CRM_LOOKUP = define(
    "crm_lookup",
    """The signed-in customer's CRM record: profile, account (plan, status), contacts,
    open tickets and recent interactions.""",
    {
        "type": "object",
        "properties": {"customer_id": _CUSTOMER_ID},
        "required": ["customer_id"],
        "additionalProperties": False,
    },
    effect=Effect.READ,
    timeout_ms=2000,
    source_kind="crm",
    principal_arguments=_BOUND_CUSTOMER,
    requires_customer=True,
)

# Only registered where the deployment trusts its caller to identify customers by e-mail
# (``ToolsSettings.allow_email_lookup``); a bound principal only ever finds itself.
CRM_FIND_CUSTOMER = define(
    "crm_find_customer",
    """Find a customer's CRM record by e-mail address. Returns the same profile as
    crm_lookup.""",
    {
        "type": "object",
        "properties": {
            "email": {"type": "string", "minLength": 3, "maxLength": 254, "pattern": "@"},
        },
        "required": ["email"],
        "additionalProperties": False,
    },
    effect=Effect.READ,
    timeout_ms=2000,
    source_kind="crm",
)

KB_SEARCH = define(
    "kb_search",
    """Search the help-center knowledge base (plans, billing policy, troubleshooting).
    Returns the top_k articles with article_id, title, a relevant snippet and a score.""",
    {
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 2, "maxLength": 200},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
    effect=Effect.READ,
    timeout_ms=3000,
    source_kind="kb",
)

BILLING_LOOKUP = define(
    "billing_lookup",
    """Billing state of the signed-in customer: subscription (plan, price, recent plan
    change), credit balance, recent invoices with their payments (failed payments and
    double charges are flagged). Give invoice_id to focus on one invoice.""",
    {
        "type": "object",
        "properties": {
            "customer_id": _CUSTOMER_ID,
            "invoice_id": _INVOICE_ID,
            "limit": {"type": "integer", "minimum": 1, "maximum": 24, "default": 6},
        },
        "required": ["customer_id"],
        "additionalProperties": False,
    },
    effect=Effect.READ,
    timeout_ms=2000,
    source_kind="billing",
    principal_arguments=_BOUND_CUSTOMER,
    requires_customer=True,
)

BILLING_REFUND = define(
    "billing_refund",
    """WRITE: refund part or all of one of the customer's paid invoices to the original
    payment method. Only when the user asked for it. Cannot exceed what was paid and not
    yet refunded. Needs an idempotency key; a retry with the same key returns the first
    result.""",
    {
        "type": "object",
        "properties": {
            "customer_id": _CUSTOMER_ID,
            "invoice_id": _INVOICE_ID,
            "amount": _AMOUNT,
            "reason": _REASON,
        },
        "required": ["customer_id", "invoice_id", "amount", "reason"],
        "additionalProperties": False,
    },
    effect=Effect.WRITE,
    timeout_ms=5000,
    source_kind="billing",
    principal_arguments=_BOUND_CUSTOMER,
    requires_customer=True,
)

BILLING_CREDIT = define(
    "billing_credit",
    """WRITE: add account credit (applied to the customer's next invoices).
    Only when the user asked for it. Needs an idempotency key; a retry with the same
    key returns the first result.""",
    {
        "type": "object",
        "properties": {
            "customer_id": _CUSTOMER_ID,
            "amount": {**_AMOUNT, "maximum": 5000},
            "reason": _REASON,
        },
        "required": ["customer_id", "amount", "reason"],
        "additionalProperties": False,
    },
    effect=Effect.WRITE,
    timeout_ms=5000,
    source_kind="billing",
    principal_arguments=_BOUND_CUSTOMER,
    requires_customer=True,
)


def default_registry(*, allow_email_lookup: bool = False) -> Registry:
    """The registry every tool-service process of this build serves.

    ``allow_email_lookup`` adds ``crm_find_customer`` (see ``ToolsSettings``).
    """
    tools = [CRM_LOOKUP, KB_SEARCH, BILLING_LOOKUP, BILLING_REFUND, BILLING_CREDIT]
    if allow_email_lookup:
        tools.append(CRM_FIND_CUSTOMER)
    return Registry(tuple(tools))
