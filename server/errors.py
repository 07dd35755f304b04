"""Domain errors. Only `server/api/status.py` turns them into gRPC statuses.

    ServiceError                 reason, message, metadata
    ├── InvalidInputError        bad request fields (carries field violations)
    ├── NotFoundError
    ├── AlreadyExistsError
    ├── ConflictError            the resource is in a state that forbids the call
    ├── FailedPreconditionError
    ├── AuthError
    │   ├── UnauthenticatedError     no, wrong, revoked or expired credentials
    │   └── PermissionDeniedError    valid credentials, not for this resource
    ├── ThrottledError           too many requests (carries retry_after)
    ├── TransientError           worth retrying (warehouse 5xx, rate limits, timeouts)
    └── TerminalError            retrying will not help

`TransientError` and `TerminalError` are what adapters raise for vendor failures; the engine retries
only `TransientError`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field: its path (`steps[0].config.table`) and what is wrong."""

    field: str
    description: str


class ServiceError(Exception):
    """Base of every error the service reports to callers.

    `message` is what callers see (an org's caller too: keep vendor internals out of it); `detail` is
    for operators only (a vendor's own error text): it goes to the server log with the request or run
    id, never into a status or a run.
    """

    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        detail: str = "",
    ):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.detail = detail


class InvalidInputError(ServiceError):
    """A request field is malformed; `violations` names each one."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: list[FieldViolation] | None = None,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        detail: str = "",
    ):
        super().__init__(message, reason=reason, metadata=metadata, detail=detail)
        self.violations = list(violations or [])


class NotFoundError(ServiceError):
    """The named resource does not exist (or is not visible to the caller)."""

    default_reason = "NOT_FOUND"


class AlreadyExistsError(ServiceError):
    """The resource to create exists already."""

    default_reason = "ALREADY_EXISTS"


class ConflictError(ServiceError):
    """The call conflicts with the resource's current state (e.g. a run already active)."""

    default_reason = "CONFLICT"


class FailedPreconditionError(ServiceError):
    """The system is not in a state that allows the call."""

    default_reason = "FAILED_PRECONDITION"


class AuthError(ServiceError):
    """Base of authentication and authorization failures."""


class UnauthenticatedError(AuthError):
    """Missing, wrong, revoked or expired credentials."""

    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(AuthError):
    """Valid credentials that may not do this."""

    default_reason = "PERMISSION_DENIED"


class ThrottledError(ServiceError):
    """Too many requests; the caller may retry after `retry_after` seconds."""

    default_reason = "RATE_LIMITED"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        detail: str = "",
    ):
        super().__init__(message, reason=reason, metadata=metadata, detail=detail)
        self.retry_after = retry_after


class TransientError(ServiceError):
    """A failure that may go away when retried."""

    default_reason = "TRANSIENT"


class TerminalError(ServiceError):
    """A failure that retrying will not fix."""

    default_reason = "TERMINAL"
