"""`server.api.limits`: every request field that can grow has a declared limit, and the checks count
without echoing."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool

from cloudact.pipeline.v1 import notification_service_pb2 as nb
from cloudact.pipeline.v1 import pipeline_service_pb2, procedure_service_pb2
from server.api import limits
from server.app import SERVICES  # every service the server registers
from server.errors import InvalidInputError


def request_types() -> list[object]:
    pool = descriptor_pool.Default()
    return [m.input_type for name in SERVICES for m in pool.FindServiceByName(name).methods]


def test_every_unbounded_request_field_has_a_limit() -> None:
    for request_type in request_types():
        limits.checker(request_type)  # type: ignore[arg-type]  # raises KeyError for a missing limit
    declared = {f"cloudact.pipeline.v1.{name}" for name in limits.LIMITS}
    elements = {  # element types of repeated message fields have their own entries
        f.message_type.full_name
        for t in request_types()
        for f in t.fields  # type: ignore[attr-defined]
        if f.message_type is not None and f.is_repeated and not f.message_type.GetOptions().map_entry
    }
    assert declared == {t.full_name for t in request_types()} | elements  # type: ignore[attr-defined]


def test_a_new_field_without_a_limit_is_refused() -> None:
    descriptor = pipeline_service_pb2.RunPipelineRequest.DESCRIPTOR
    saved = limits.LIMITS["RunPipelineRequest"]
    try:
        limits.LIMITS["RunPipelineRequest"] = {k: v for k, v in saved.items() if k != "request_id"}  # type: ignore[index]
        with pytest.raises(KeyError, match="request_id has no size limit"):
            limits.checker(descriptor)
    finally:
        limits.LIMITS["RunPipelineRequest"] = saved  # type: ignore[index]


def violations(request: object) -> list[tuple[str, str]]:
    check = limits.checker(request.DESCRIPTOR)  # type: ignore[attr-defined]
    with pytest.raises(InvalidInputError) as caught:
        check(request)
    assert caught.value.reason == "REQUEST_TOO_LARGE"
    return [(v.field, v.description) for v in caught.value.violations]


def test_strings_maps_and_lists_are_counted() -> None:
    request = pipeline_service_pb2.RunPipelineRequest(
        org_slug="o" * 65, date="2025-01-011", parameters={"k" * 65: "v", "ok": "x" * 1025}
    )
    found = violations(request)
    assert found[:2] == [
        ("org_slug", "at most 64 characters (got 65)"),
        ("date", "at most 10 characters (got 11)"),
    ]
    # Map entries have no order: each is named by its position, and the key is never echoed.
    assert sorted(d for _, d in found[2:]) == [
        "at most 1024 characters (got 1025)",
        "at most 64 characters (got 65)",
    ]
    assert {f.rsplit(".", 1)[1] for f, _ in found[2:]} == {"key", "value"}
    many = pipeline_service_pb2.RunPipelineRequest(parameters={f"k{i}": "v" for i in range(51)})
    assert violations(many) == [("parameters", "at most 50 entries (got 51)")]
    names = procedure_service_pb2.SyncProceduresRequest(names=["n"] * 201)
    assert violations(names) == [("names", "at most 200 entries (got 201)")]
    long_name = procedure_service_pb2.SyncProceduresRequest(names=["ok", "n" * 129])
    assert violations(long_name) == [("names[1]", "at most 128 characters (got 129)")]


def test_values_at_the_limit_pass() -> None:
    check = limits.checker(pipeline_service_pb2.RunPipelineRequest.DESCRIPTOR)
    check(
        pipeline_service_pb2.RunPipelineRequest(
            org_slug="o" * 64,
            request_id="r" * 128,
            parameters={f"{i:02d}" + "k" * 62: "v" * 1024 for i in range(50)},
        )
    )


def test_elements_of_repeated_messages_are_checked() -> None:
    request = nb.UpdateNotificationSettingsRequest(
        org_slug="acme",
        pipelines=[nb.PipelineNotifications(pipeline="a/b/c"), nb.PipelineNotifications(pipeline="x" * 300)],
    )
    assert violations(request) == [("pipelines[1].pipeline", "at most 194 characters (got 300)")]
    too_many = nb.UpdateNotificationSettingsRequest(pipelines=[nb.PipelineNotifications()] * 101)
    assert violations(too_many) == [("pipelines", "at most 100 entries (got 101)")]
