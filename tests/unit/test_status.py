"""`server.api.status.to_status`: every domain error becomes the right google.rpc.Status with details."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import message
from google.rpc import error_details_pb2, status_pb2

from server import errors
from server.api.status import DOMAIN, code_of, to_status

DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID = "req-1234"


@dataclass
class Parsed:
    code: grpc.StatusCode
    message: str
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None
    retry: error_details_pb2.RetryInfo | None


def parse(exc: BaseException) -> Parsed:
    """Build the status and read it back the way a client does: from the details trailer."""
    status = to_status(exc, REQUEST_ID)
    trailers = [value for key, value in status.trailing_metadata if key == DETAILS_KEY]
    assert len(trailers) == 1
    rpc = status_pb2.Status.FromString(trailers[0])
    assert rpc.code == status.code.value[0]
    assert rpc.message == status.details
    found: dict[str, message.Message] = {}
    for any_detail in rpc.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if any_detail.Is(cls.DESCRIPTOR):
                assert cls.DESCRIPTOR.full_name not in found, "detail repeated"
                detail = cls()
                any_detail.Unpack(detail)
                found[cls.DESCRIPTOR.full_name] = detail
    assert len(found) == len(rpc.details), "unexpected detail type"
    info = found.get("google.rpc.ErrorInfo")
    assert isinstance(info, error_details_pb2.ErrorInfo), "ErrorInfo is always present"
    bad = found.get("google.rpc.BadRequest")
    retry = found.get("google.rpc.RetryInfo")
    assert bad is None or isinstance(bad, error_details_pb2.BadRequest)
    assert retry is None or isinstance(retry, error_details_pb2.RetryInfo)
    return Parsed(status.code, status.details, rpc, info, bad, retry)


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (errors.InvalidInputError("bad"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (errors.NotFoundError("gone"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (errors.AlreadyExistsError("dup"), grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
        (errors.ConflictError("busy"), grpc.StatusCode.ABORTED, "CONFLICT"),
        (
            errors.FailedPreconditionError("not yet"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "FAILED_PRECONDITION",
        ),
        (errors.UnauthenticatedError("who?"), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (errors.PermissionDeniedError("no"), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        (
            errors.ThrottledError("slow down", retry_after=2.0),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        ),
        (errors.TransientError("flaky"), grpc.StatusCode.UNAVAILABLE, "TRANSIENT"),
        (errors.TerminalError("broken"), grpc.StatusCode.FAILED_PRECONDITION, "TERMINAL"),
    ],
)
def test_domain_errors_map_to_codes(exc: errors.ServiceError, code: grpc.StatusCode, reason: str) -> None:
    parsed = parse(exc)
    assert parsed.code == code
    assert parsed.message == exc.message
    assert parsed.info.reason == reason
    assert parsed.info.domain == DOMAIN == "cloudact.io"
    assert (parsed.retry is not None) == isinstance(exc, errors.ThrottledError)
    assert parsed.bad_request is None  # no violations given


def test_invalid_input_carries_field_violations() -> None:
    exc = errors.InvalidInputError(
        "invalid request",
        [
            errors.FieldViolation("names[0]", "no procedure file named 'x'"),
            errors.FieldViolation("steps[1].config.table", "required"),
        ],
        reason="PROCEDURE_FILE_NOT_FOUND",
        metadata={"name": "x"},
    )
    parsed = parse(exc)
    assert parsed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert parsed.bad_request is not None
    assert [(v.field, v.description) for v in parsed.bad_request.field_violations] == [
        ("names[0]", "no procedure file named 'x'"),
        ("steps[1].config.table", "required"),
    ]
    assert parsed.info.reason == "PROCEDURE_FILE_NOT_FOUND"
    assert dict(parsed.info.metadata) == {"name": "x"}


def test_subclass_of_invalid_input_keeps_the_code_and_violations() -> None:
    from server.pipelines.catalog import ConfigError

    parsed = parse(
        ConfigError(
            "bad config",
            [errors.FieldViolation("a/b/c.yml:steps", "empty")],
            reason="INVALID_PIPELINE_CONFIG",
        )
    )
    assert parsed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert parsed.bad_request is not None
    assert [v.field for v in parsed.bad_request.field_violations] == ["a/b/c.yml:steps"]


def test_not_found_metadata_and_reason() -> None:
    parsed = parse(
        errors.NotFoundError("procedure 'x' not found", reason="PROCEDURE_NOT_FOUND", metadata={"name": "x"})
    )
    assert parsed.code == grpc.StatusCode.NOT_FOUND
    assert parsed.info.reason == "PROCEDURE_NOT_FOUND"
    assert dict(parsed.info.metadata) == {"name": "x"}


@pytest.mark.parametrize(("retry_after", "seconds"), [(0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (30.5, 31)])
def test_throttled_has_retry_info_rounded_up_to_whole_seconds(retry_after: float, seconds: int) -> None:
    parsed = parse(errors.ThrottledError("too many requests", retry_after=retry_after))
    assert parsed.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert parsed.retry is not None
    assert parsed.retry.retry_delay.seconds == seconds
    assert parsed.retry.retry_delay.nanos == 0


def test_conflict_is_aborted_not_already_exists() -> None:
    assert parse(errors.ConflictError("run active", reason="RUN_ACTIVE")).code == grpc.StatusCode.ABORTED


def test_transient_is_unavailable() -> None:
    parsed = parse(errors.TransientError("warehouse down", reason="WAREHOUSE_UNAVAILABLE"))
    assert parsed.code == grpc.StatusCode.UNAVAILABLE
    assert parsed.info.reason == "WAREHOUSE_UNAVAILABLE"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("secret /path/to/server.py line 42"),
        KeyError("secret /path"),
        ValueError("secret /path"),
        ZeroDivisionError("secret /path"),
    ],
)
def test_unexpected_exception_is_internal_without_its_text(exc: BaseException) -> None:
    parsed = parse(exc)
    assert parsed.code == grpc.StatusCode.INTERNAL
    assert REQUEST_ID in parsed.message
    assert "secret" not in parsed.message and "/path" not in parsed.message
    assert type(exc).__name__ not in parsed.message
    assert parsed.info.reason == "INTERNAL"
    assert parsed.info.domain == DOMAIN
    assert dict(parsed.info.metadata) == {"request_id": REQUEST_ID}
    raw = b"".join(v for k, v in to_status(exc, REQUEST_ID).trailing_metadata if k == DETAILS_KEY)
    assert b"secret" not in raw
    assert parsed.bad_request is None and parsed.retry is None


def test_base_service_error_is_internal() -> None:
    exc = errors.ServiceError("something odd")
    assert code_of(exc) == grpc.StatusCode.INTERNAL.value[0]
    parsed = parse(exc)
    assert parsed.code == grpc.StatusCode.INTERNAL
    assert parsed.info.reason == "INTERNAL"


def test_auth_errors_keep_their_own_codes() -> None:
    assert (
        parse(errors.UnauthenticatedError("bad key", reason="INVALID_API_KEY")).code
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        parse(errors.PermissionDeniedError("root only", reason="ROOT_KEY_REQUIRED")).code
        == grpc.StatusCode.PERMISSION_DENIED
    )


def test_whatever_an_error_carries_the_status_stays_small() -> None:
    exc = errors.InvalidInputError(
        "m" * 100_000,
        [errors.FieldViolation("f" * 10_000, "d" * 10_000) for _ in range(2_000)],
        reason="R" * 1_000,
        metadata={f"k{i}" * 100: "v" * 10_000 for i in range(100)},
        detail="vendor text " * 1_000,
    )
    status = to_status(exc, REQUEST_ID)
    assert sum(len(k) + len(v) for k, v in status.trailing_metadata) < 16 * 1024
    parsed = parse(exc)
    assert len(parsed.message) == 512 and parsed.message.endswith("…")
    assert parsed.bad_request is not None
    shown = parsed.bad_request.field_violations
    assert len(shown) == 21
    assert all(len(v.field) <= 128 and len(v.description) <= 256 for v in shown)
    assert (shown[-1].field, shown[-1].description) == ("*", "1980 more not shown")
    assert len(parsed.info.metadata) == 10
    assert all(len(v) <= 128 for v in parsed.info.metadata.values())
    assert "vendor text" not in status.details


def test_short_errors_are_untouched() -> None:
    exc = errors.InvalidInputError("bad", [errors.FieldViolation("a", "b")], metadata={"k": "v"})
    parsed = parse(exc)
    assert parsed.message == "bad"
    assert [(v.field, v.description) for v in parsed.bad_request.field_violations] == [("a", "b")]  # type: ignore[union-attr]
    assert dict(parsed.info.metadata) == {"k": "v"}
