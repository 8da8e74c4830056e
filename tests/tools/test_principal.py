"""Parsing the ``agentmesh-principal`` metadata into a Principal."""

from __future__ import annotations

import pytest

from services.tools.principal import PRINCIPAL_HEADER, Principal
from shared.errors import InvalidArgument


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((), Principal.anonymous()),
        (None, Principal.anonymous()),
        (((PRINCIPAL_HEADER, "anonymous"),), Principal.anonymous()),
        (((PRINCIPAL_HEADER, "customer:CUST-0001"),), Principal("CUST-0001")),
        (((PRINCIPAL_HEADER, b"customer:CUST-0042"),), Principal("CUST-0042")),
        ((("x-request-id", "r1"), (PRINCIPAL_HEADER, "anonymous")), Principal.anonymous()),
    ],
)
def test_well_formed_principals(
    metadata: tuple[tuple[str, str | bytes], ...] | None, expected: Principal
) -> None:
    principal = Principal.from_metadata(metadata)
    assert principal == expected
    assert Principal.parse(principal.header_value()) == principal


@pytest.mark.parametrize(
    "value",
    [
        "",
        "customer:",
        "customer: CUST-0001",
        "customer:CUST 0001",
        "customer:CUST-0001\n",
        "customer:CUST-0001;admin",
        "Customer:CUST-0001",
        "ANONYMOUS",
        "admin",
        "customer:" + "9" * 65,
    ],
)
def test_malformed_principal_names_the_header(value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        Principal.from_metadata(((PRINCIPAL_HEADER, value),))
    assert caught.value.field == PRINCIPAL_HEADER


def test_the_header_twice_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        Principal.from_metadata(
            ((PRINCIPAL_HEADER, "customer:CUST-0001"), (PRINCIPAL_HEADER, "customer:CUST-0002"))
        )
    assert caught.value.field == PRINCIPAL_HEADER


def test_bound_values() -> None:
    customer = Principal.customer("CUST-0007")
    assert not customer.is_anonymous and customer.bound_value("customer_id") == "CUST-0007"
    assert customer.bound_value("invoice_id") is None
    assert Principal.anonymous().is_anonymous
    assert Principal.anonymous().bound_value("customer_id") is None


@pytest.mark.parametrize("customer_id", ["", "CUST-0001", "acme.7_x"])
def test_the_orchestrator_sends_what_the_tools_service_parses(customer_id: str) -> None:
    """The orchestrator writes the header with its own session Principal: the two sides of
    the wire format must agree (the header name and both value shapes)."""
    from services.orchestrator import clients
    from services.orchestrator.loop.types import Principal as SessionPrincipal

    assert clients.PRINCIPAL_HEADER == PRINCIPAL_HEADER
    sent = SessionPrincipal(customer_id).header()
    assert Principal.from_metadata(((clients.PRINCIPAL_HEADER, sent),)) == Principal(
        customer_id or None
    )
