"""The wire form of a tool call's principal, shared by the orchestrator (which sends it) and the
tools service (which parses and enforces it): one header name, one customer-id syntax."""

from __future__ import annotations

import re

PRINCIPAL_HEADER = "agentmesh-principal"
ANONYMOUS = "anonymous"
CUSTOMER_PREFIX = "customer:"
# Conservative: no whitespace, separators or control characters can ride in an id.
CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def header_value(customer_id: str | None) -> str:
    """The metadata value for a call made for ``customer_id`` (None or empty: anonymous)."""
    return CUSTOMER_PREFIX + customer_id if customer_id else ANONYMOUS


def valid_customer_id(customer_id: str) -> bool:
    return CUSTOMER_ID.fullmatch(customer_id) is not None
