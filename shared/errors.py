"""Domain errors and their gRPC status.

Handlers and backends raise these; the error interceptor turns them into a status with
``google.rpc.ErrorInfo`` (plus ``BadRequest`` for a bad field and ``RetryInfo`` for an
exhausted resource). Any other exception becomes INTERNAL without its text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

ERROR_DOMAIN = "agentmesh"


class AgentmeshError(Exception):
    """An error whose message is safe to show a caller."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(AgentmeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        field: str,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            f"{field}: {message}", reason=reason, metadata={"field": field, **(metadata or {})}
        )
        self.field = field
        self.description = message


class NotFound(AgentmeshError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(AgentmeshError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(AgentmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class RetryableError(AgentmeshError):
    """An error the caller may retry after ``retry_after_s`` (sent as ``RetryInfo``)."""

    # Whether the message itself says when to retry.
    hint_in_message = False

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if self.hint_in_message:
            message = f"{message} (retry after {retry_after_s:.2f}s)"
        super().__init__(
            message,
            reason=reason,
            metadata={"retry_after_s": f"{retry_after_s:.3f}", **(metadata or {})},
        )
        self.retry_after_s = retry_after_s


class ResourceExhausted(RetryableError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"
    hint_in_message = True


class Aborted(RetryableError):
    """A concurrency conflict (a lease held elsewhere, a fenced write); retry after the hint."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unavailable(AgentmeshError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(AgentmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(AgentmeshError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class Unimplemented(AgentmeshError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Unauthenticated(AgentmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(AgentmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


def to_rich_status(error: AgentmeshError) -> grpc.Status:
    """The status (code, message, details trailer) an AgentmeshError travels as."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    )
    details.append(info)
    if isinstance(error, InvalidArgument):
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.description
                    )
                ]
            )
        )
        details.append(bad)
    if isinstance(error, RetryableError):
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    code_value = error.code.value[0]
    status = status_pb2.Status(code=code_value, message=error.message, details=details)
    assert code_pb2.Code.Name(code_value)
    rich: grpc.Status = rpc_status.to_status(status)
    return rich


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: AgentmeshError) -> None:
    """Ends the RPC with ``error``'s rich status (raises, as ``context.abort`` does)."""
    status = to_rich_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
