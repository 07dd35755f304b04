"""Reading google.rpc error details from a failed gRPC call."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2
from grpc import aio


def status_of(error: aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status carried in the call's trailers."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no status details in trailers")


def error_info(error: aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo of a failed call."""
    infos = []
    for detail in status_of(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, infos
    return infos[0]
