"""Notification pieces without servers: the message and run alerts."""

from __future__ import annotations

from datetime import UTC, datetime

from server.engine.run import Run, StepView
from server.notify.alert import Alert
from server.notify.config import NotificationConfig
from server.notify.notifier import render, run_alert


def test_message_is_bounded_and_says_how_to_inspect() -> None:
    alert = Alert("RUN_FAILED", "acme", "a/b/c", "r" * 32, "FAILED", "WAREHOUSE_REJECTED", "x" * 5000, 2)
    message = render(
        alert, NotificationConfig(rest_base_url="https://api.test", grpc_address="grpc.test:443")
    )
    assert message.subject == "[CloudAct] a/b/c failed for acme"
    assert "x" * 500 in message.text and "x" * 501 not in message.text
    assert f"curl -s https://api.test/api/v1/pipelines/runs/{'r' * 32}" in message.text
    assert "grpc.test:443 cloudact.pipeline.v1.PipelineService/GetPipelineRun" in message.text
    assert "Attempt: 2" in message.text


def run(trigger: str, state: str) -> Run:
    r = Run(
        run_id="r1",
        org_slug="acme",
        pipeline_key="a/b/c",
        pipeline_id="c",
        trigger=trigger,
        triggered_by="t",
        parameters={},
        request_id="",
        create_time=datetime.now(UTC),
        dedupe_key="d",
        steps={"s": StepView("s", "generic.noop", state="FAILED", error_reason="WAREHOUSE_NOT_FOUND")},
    )
    r.state = state
    return r


def test_run_alerts_only_for_failed_api_runs() -> None:
    alert = run_alert(run("API", "FAILED"))
    assert alert is not None and (alert.event, alert.reason) == ("RUN_FAILED", "WAREHOUSE_NOT_FOUND")
    timed_out = run_alert(run("API", "TIMEOUT"))
    assert timed_out is not None and timed_out.event == "RUN_TIMED_OUT"
    assert run_alert(run("API", "COMPLETED")) is None
    assert run_alert(run("SCHEDULER", "FAILED")) is None  # the scheduler alerts once its retries are over
