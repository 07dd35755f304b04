"""The one seam that turns domain errors into `google.rpc.Status` (and so into HTTP codes via Envoy).

Every status carries one `ErrorInfo` (stable `reason`, domain `cloudact.io`, metadata); input errors add
`BadRequest` field violations, throttling adds `RetryInfo`. An unexpected exception becomes INTERNAL with
the request id and nothing of Python's internals.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server import errors

DOMAIN = "cloudact.io"

_CODES: list[tuple[type[errors.ServiceError], int]] = [
    (errors.InvalidInputError, code_pb2.INVALID_ARGUMENT),
    (errors.NotFoundError, code_pb2.NOT_FOUND),
    (errors.AlreadyExistsError, code_pb2.ALREADY_EXISTS),
    (errors.ConflictError, code_pb2.ABORTED),
    (errors.FailedPreconditionError, code_pb2.FAILED_PRECONDITION),
    (errors.UnauthenticatedError, code_pb2.UNAUTHENTICATED),
    (errors.PermissionDeniedError, code_pb2.PERMISSION_DENIED),
    (errors.ThrottledError, code_pb2.RESOURCE_EXHAUSTED),
    (errors.TransientError, code_pb2.UNAVAILABLE),
    (errors.TerminalError, code_pb2.FAILED_PRECONDITION),
]


def code_of(exc: errors.ServiceError) -> int:
    """The google.rpc code for a domain error."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return int(code)
    return int(code_pb2.INTERNAL)


def to_status(exc: BaseException, request_id: str) -> grpc.Status:
    """Build the gRPC status (with details trailer) for any exception."""
    if not isinstance(exc, errors.ServiceError):
        exc = errors.ServiceError(
            f"internal error (request id {request_id})",
            reason="INTERNAL",
            metadata={"request_id": request_id},
        )
    status = status_pb2.Status(code=code_of(exc), message=exc.message)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
    status.details.add().Pack(info)
    if isinstance(exc, errors.InvalidInputError) and exc.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in exc.violations
            ]
        )
        status.details.add().Pack(bad)
    if isinstance(exc, errors.ThrottledError):
        delay = duration_pb2.Duration(seconds=max(1, math.ceil(exc.retry_after)))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)
