"""Who a tool call is made for: the ``agentmesh-principal`` gRPC metadata, parsed once.

``customer:<customer_id>`` binds the call to one customer; ``anonymous`` (or no header at
all) binds it to nobody. Anything else is refused as INVALID_ARGUMENT naming the header:
a caller that means to bind a customer and gets the syntax wrong must not silently run
as anonymous (or as someone else).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.errors import InvalidArgument
from shared.principal_wire import (
    ANONYMOUS,
    CUSTOMER_PREFIX,
    PRINCIPAL_HEADER,
    header_value,
    valid_customer_id,
)

__all__ = ["ANONYMOUS", "CUSTOMER_PREFIX", "PRINCIPAL_HEADER", "Principal"]

MetadataItems = Iterable[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Principal:
    """The caller a tool call runs for; ``customer_id`` is None when anonymous."""

    customer_id: str | None = None

    @classmethod
    def anonymous(cls) -> Principal:
        return cls(None)

    @classmethod
    def customer(cls, customer_id: str) -> Principal:
        if not valid_customer_id(customer_id):
            raise InvalidArgument(PRINCIPAL_HEADER, "has a malformed customer id")
        return cls(customer_id)

    @property
    def is_anonymous(self) -> bool:
        return self.customer_id is None

    def header_value(self) -> str:
        """The metadata value that parses back to this principal."""
        return header_value(self.customer_id)

    def bound_value(self, argument: str) -> str | None:
        """The value this principal gives a principal-bound ``argument`` (None: it has none)."""
        if argument == "customer_id":
            return self.customer_id
        return None

    @classmethod
    def parse(cls, value: str | None) -> Principal:
        """``None`` (no header) or ``anonymous`` -> anonymous; ``customer:<id>`` -> bound."""
        if value is None or value == ANONYMOUS:
            return cls.anonymous()
        if value.startswith(CUSTOMER_PREFIX):
            return cls.customer(value[len(CUSTOMER_PREFIX) :])
        raise InvalidArgument(
            PRINCIPAL_HEADER, f"must be '{ANONYMOUS}' or '{CUSTOMER_PREFIX}<customer_id>'"
        )

    @classmethod
    def from_metadata(cls, metadata: MetadataItems | None) -> Principal:
        """The principal of an RPC's invocation metadata (the header at most once)."""
        values = [
            value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            for key, value in (metadata or ())
            if key.lower() == PRINCIPAL_HEADER
        ]
        if len(values) > 1:
            raise InvalidArgument(PRINCIPAL_HEADER, "must be sent at most once")
        return cls.parse(values[0] if values else None)
