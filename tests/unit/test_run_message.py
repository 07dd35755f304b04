"""`run_message` and `set_timestamp`: the proto form of a run, exact to the microsecond, with unset times
left unset and every state and trigger mapped to its enum value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import timestamp_pb2

from cloudact.pipeline.v1 import pipeline_run_pb2
from server.api.convert import set_timestamp, timestamp
from server.api.pipelines import run_message
from server.engine.run import TERMINAL, Run, StepView

CREATED = datetime(2026, 11, 30, 12, 0, 1, 234567, tzinfo=UTC)


def _run(**fields: object) -> Run:
    run = Run(
        run_id="a" * 32,
        org_slug="acme_corp",
        pipeline_key="openai/usage/daily",
        pipeline_id="openai_usage_daily",
        trigger="SCHEDULER",
        triggered_by="scheduler",
        parameters={"date": "2026-11-29", "force_refresh": "true"},
        request_id="req-1",
        create_time=CREATED,
        steps={"pull": StepView("pull", "openai.usage"), "load": StepView("load", "generic.noop")},
    )
    for name, value in fields.items():
        setattr(run, name, value)
    return run


@pytest.mark.parametrize(
    "value",
    [
        CREATED,
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch: nanos stay positive
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC) + timedelta(microseconds=1),
    ],
)
def test_set_timestamp_matches_the_libraries_conversion(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    message = pipeline_run_pb2.PipelineRun()

    set_timestamp(message.create_time, value)

    assert message.create_time == expected == timestamp(value)
    assert message.create_time.ToDatetime(tzinfo=UTC) == value


def test_set_timestamp_of_none_leaves_the_field_unset() -> None:
    message = pipeline_run_pb2.PipelineRun()

    set_timestamp(message.end_time, None)

    assert not message.HasField("end_time")


def test_a_running_run_with_pending_steps() -> None:
    started = CREATED + timedelta(milliseconds=3)
    message = run_message(_run(state="RUNNING", start_time=started))

    assert (message.provider, message.domain, message.pipeline) == ("openai", "usage", "daily")
    assert message.pipeline_id == "openai_usage_daily"
    assert message.state == pipeline_run_pb2.RUN_STATE_RUNNING
    assert message.trigger == pipeline_run_pb2.TRIGGER_SCHEDULER
    assert dict(message.parameters) == {"date": "2026-11-29", "force_refresh": "true"}
    assert message.request_id == "req-1" and message.triggered_by == "scheduler"
    assert message.create_time.ToDatetime(tzinfo=UTC) == CREATED
    assert message.start_time.ToDatetime(tzinfo=UTC) == started
    assert not message.HasField("end_time")
    assert [(s.step_id, s.ps_type, s.state) for s in message.steps] == [
        ("pull", "openai.usage", pipeline_run_pb2.STEP_STATE_PENDING),
        ("load", "generic.noop", pipeline_run_pb2.STEP_STATE_PENDING),
    ]
    assert not message.steps[0].HasField("start_time") and not message.steps[0].HasField("end_time")


def test_an_ended_run_carries_its_steps_outcomes() -> None:
    ended = CREATED + timedelta(seconds=2)
    run = _run(state="FAILED", start_time=CREATED, end_time=ended, reason="STEP_FAILED", error="boom")
    pull = run.steps["pull"]
    pull.state, pull.attempts, pull.duration_ms, pull.rows_written = "FAILED", 3, 1500, 7
    pull.error, pull.error_reason = "boom", "UPSTREAM_UNAVAILABLE"
    pull.started_at, pull.ended_at = CREATED, ended
    run.steps["load"].state = "NOT_RUN"

    message = run_message(run)

    assert message.state == pipeline_run_pb2.RUN_STATE_FAILED
    assert (message.reason, message.error) == ("STEP_FAILED", "boom")
    assert message.end_time.ToDatetime(tzinfo=UTC) == ended
    step = message.steps[0]
    assert step.state == pipeline_run_pb2.STEP_STATE_FAILED
    assert (step.attempts, step.duration_ms, step.rows_written) == (3, 1500, 7)
    assert (step.error, step.error_reason) == ("boom", "UPSTREAM_UNAVAILABLE")
    assert step.start_time.ToDatetime(tzinfo=UTC) == CREATED
    assert step.end_time.ToDatetime(tzinfo=UTC) == ended
    assert message.steps[1].state == pipeline_run_pb2.STEP_STATE_NOT_RUN


@pytest.mark.parametrize("state", sorted(TERMINAL | {"PENDING", "RUNNING", "CANCELLING"}))
def test_every_run_state_has_its_enum_value(state: str) -> None:
    assert run_message(_run(state=state)).state == pipeline_run_pb2.RunState.Value(f"RUN_STATE_{state}")


def test_without_steps() -> None:
    assert not run_message(_run(), with_steps=False).steps
