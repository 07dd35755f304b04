"""The one seam that turns domain errors into `google.rpc.Status` (and so into HTTP codes via Envoy).

Every status carries one `ErrorInfo` (stable `reason`, domain `cloudact.io`, metadata); input errors add
`BadRequest` field violations, throttling adds `RetryInfo`. An unexpected exception becomes INTERNAL with
the request id and nothing of Python's internals.

What a status echoes is bounded here, whatever the error carries: the message, each field path,
description and metadata value are cut to a fixed length and at most `MAX_VIOLATIONS` violations and
`MAX_METADATA` metadata entries are sent, so a status stays a few KiB. (Past ~64 KiB of trailers Envoy
resets the HTTP/2 connection it shares with other callers' requests.)
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server import errors

DOMAIN = "cloudact.io"

MAX_MESSAGE = 512
MAX_FIELD = 128
MAX_DESCRIPTION = 256
MAX_VIOLATIONS = 20
MAX_METADATA = 10
MAX_METADATA_VALUE = 128

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


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_status(exc: BaseException, request_id: str) -> grpc.Status:
    """Build the gRPC status (with details trailer) for any exception."""
    if not isinstance(exc, errors.ServiceError):
        exc = errors.ServiceError(
            f"internal error (request id {request_id})",
            reason="INTERNAL",
            metadata={"request_id": request_id},
        )
    status = status_pb2.Status(code=code_of(exc), message=clip(exc.message, MAX_MESSAGE))
    metadata = {
        clip(k, MAX_FIELD): clip(v, MAX_METADATA_VALUE) for k, v in list(exc.metadata.items())[:MAX_METADATA]
    }
    info = error_details_pb2.ErrorInfo(reason=clip(exc.reason, MAX_FIELD), domain=DOMAIN, metadata=metadata)
    status.details.add().Pack(info)
    if isinstance(exc, errors.InvalidInputError) and exc.violations:
        shown = exc.violations[:MAX_VIOLATIONS]
        violations = [
            error_details_pb2.BadRequest.FieldViolation(
                field=clip(v.field, MAX_FIELD), description=clip(v.description, MAX_DESCRIPTION)
            )
            for v in shown
        ]
        if len(exc.violations) > len(shown):
            more = len(exc.violations) - len(shown)
            violations.append(
                error_details_pb2.BadRequest.FieldViolation(field="*", description=f"{more} more not shown")
            )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=violations))
    if isinstance(exc, errors.ThrottledError):
        delay = duration_pb2.Duration(seconds=max(1, math.ceil(exc.retry_after)))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)
