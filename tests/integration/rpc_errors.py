"""Reading google.rpc error details from a failed gRPC call: the one place tests parse the
`grpc-status-details-bin` trailer."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

DOMAIN = "cloudact.io"
M = TypeVar("M", bound=Message)


def status_of(error: aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status in the call's trailers; it must agree with the call's code and message."""
    raw = [v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"]
    assert len(raw) == 1, error.trailing_metadata()
    assert isinstance(raw[0], bytes)
    status = status_pb2.Status.FromString(raw[0])
    assert status.code == error.code().value[0]
    assert status.message == error.details()
    return status


def details(status: status_pb2.Status, kind: type[M]) -> list[M]:
    """Every detail of the status of type `kind`."""
    found = []
    for detail in status.details:
        message = kind()
        if detail.Unpack(message):
            found.append(message)
    return found


def one_detail(status: status_pb2.Status, kind: type[M]) -> M:
    """The single detail of type `kind`."""
    found = details(status, kind)
    assert len(found) == 1, status
    return found[0]


def error_info(error: aio.AioRpcError | status_pb2.Status) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo of a failed call (or of its status), in our domain."""
    status = error if isinstance(error, status_pb2.Status) else status_of(error)
    info = one_detail(status, error_details_pb2.ErrorInfo)
    assert info.domain == DOMAIN
    return info
