"""Retryable domain errors travel with a RetryInfo detail and the hint in their metadata."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from shared.errors import Aborted, ResourceExhausted, RetryableError, to_rich_status


def _details(status: grpc.Status) -> status_pb2.Status:
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    parsed = status_pb2.Status()
    parsed.ParseFromString(raw)
    return parsed


def _retry_ms(parsed: status_pb2.Status) -> list[int]:
    delays = []
    for detail in parsed.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delays.append(info.retry_delay.ToMilliseconds())
    return delays


def test_resource_exhausted_says_when_in_its_message() -> None:
    error = ResourceExhausted("lane busy", retry_after_s=0.25, reason="BUSY")
    assert isinstance(error, RetryableError)
    assert error.message == "lane busy (retry after 0.25s)"
    assert error.metadata == {"retry_after_s": "0.250"}
    status = to_rich_status(error)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retry_ms(_details(status)) == [250]


def test_aborted_keeps_its_message_and_carries_retry_info() -> None:
    error = Aborted("lease held elsewhere", retry_after_s=1.5, metadata={"session": "s1"})
    assert error.message == "lease held elsewhere"
    assert error.reason == "ABORTED"
    assert error.metadata == {"retry_after_s": "1.500", "session": "s1"}
    status = to_rich_status(error)
    assert status.code == grpc.StatusCode.ABORTED
    assert status.details == "lease held elsewhere"
    assert _retry_ms(_details(status)) == [1500]
