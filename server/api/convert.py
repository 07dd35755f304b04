"""Conversions between domain values and protobuf well-known types, shared by the servicers."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp for an aware datetime; None stays None (the field is left unset)."""
    if value is None:
        return None
    message = timestamp_pb2.Timestamp()
    set_timestamp(message, value)
    return message


def set_timestamp(field: timestamp_pb2.Timestamp, value: datetime | None) -> None:
    """Set a message's Timestamp field in place from an aware datetime; None leaves it unset. Half the
    cost of building a Timestamp and copying it into the field (what a constructor keyword does)."""
    if value is not None:
        delta = value - _EPOCH  # exact integer arithmetic (FromDatetime costs several times more)
        field.seconds = delta.days * 86400 + delta.seconds
        field.nanos = delta.microseconds * 1000
