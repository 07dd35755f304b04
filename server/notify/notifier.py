"""Tells orgs about their runs: RUN_FAILED, RUN_TIMED_OUT, RUN_RECOVERED (succeeded after failing) and
QUOTA_EXCEEDED, by e-mail and Slack.

`publish(alert)` only hands the alert to a background task and returns: sending never delays, blocks or
fails a run (a full hand-off queue drops the alert with a log line). Per alert: the org's settings (or the
global defaults) decide whether the event is wanted and who hears it; the cooldown per org x pipeline x
event is claimed in PostgreSQL by one statement, so over every replica one alert per window is sent and
the others are logged SUPPRESSED (COOLDOWN); each channel is tried up to `max_attempts` times with
exponential backoff for transient failures; each outcome (SENT, FAILED with a stable reason, SUPPRESSED)
is a row of the notification log, readable by RPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from server import metrics
from server.engine.run import Run
from server.notify.alert import Alert
from server.notify.channels import DeliveryError, EmailChannel, Message
from server.notify.config import NotificationConfig
from server.state.notifications import NotificationStore, OrgNotificationSettings

log = logging.getLogger(__name__)

MAX_PENDING = 1_000
ERROR_CHARS = 500


class SlackPoster(Protocol):
    """Posts to an org's webhook (`server.notify.webhooks.SlackWebhooks`)."""

    async def post(self, org_slug: str, message: Message) -> None:
        """Deliver or raise DeliveryError."""
        ...


_TITLES = {
    "RUN_FAILED": "failed",
    "RUN_TIMED_OUT": "timed out",
    "RUN_RECOVERED": "succeeded again",
    "QUOTA_EXCEEDED": "was deferred: quota exceeded",
}


def render(alert: Alert, config: NotificationConfig) -> Message:
    """The message of an alert: what happened and how to look at the run (REST and grpcurl)."""
    subject = f"[CloudAct] {alert.pipeline_key} {_TITLES.get(alert.event, alert.event)} for {alert.org_slug}"
    lines = [
        f"Org: {alert.org_slug}",
        f"Pipeline: {alert.pipeline_key}",
        f"Event: {alert.event}",
        f"Run: {alert.run_id or '(not started)'}",
        f"State: {alert.state}",
        f"Reason: {alert.reason or '-'}",
        f"Attempt: {alert.attempt}",
    ]
    if alert.error:
        lines.append(f"Error: {alert.error[:ERROR_CHARS]}")
    if alert.run_id:
        lines += [
            "",
            "Inspect the run:",
            f'  curl -s {config.rest_base_url}/api/v1/pipelines/runs/{alert.run_id} -H "X-API-Key: $KEY"',
            f'  grpcurl -H "x-api-key: $KEY" -d \'{{"run_id":"{alert.run_id}"}}\' {config.grpc_address} '
            "cloudact.pipeline.v1.PipelineService/GetPipelineRun",
        ]
    return Message(subject, "\n".join(lines))


def run_alert(run: Run) -> Alert | None:
    """The alert of an ended run started through the API (the scheduler alerts about its own runs once
    their retries are over): RUN_FAILED or RUN_TIMED_OUT, else None."""
    if run.trigger != "API" or run.state not in ("FAILED", "TIMEOUT"):
        return None
    reasons = [s.error_reason for s in run.steps.values() if s.error_reason]
    return Alert(
        "RUN_TIMED_OUT" if run.state == "TIMEOUT" else "RUN_FAILED",
        run.org_slug,
        run.pipeline_key,
        run.run_id,
        run.state,
        reasons[0] if reasons else run.reason,
        run.error,
        1,
    )


class Notifier:
    """Delivers alerts in the background (see the module docstring)."""

    def __init__(
        self,
        config: NotificationConfig,
        store: NotificationStore,
        *,
        slack: SlackPoster | None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._store = store
        self._slack = slack if config.slack_on else None
        self._sleep = sleep
        self._email = EmailChannel(config.email) if config.email_on and config.email else None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> NotificationConfig:
        """The global settings."""
        return self._config

    def run_ended(self, run: Run) -> None:
        """Publish the alert of an ended API run, if there is one."""
        alert = run_alert(run)
        if alert is not None:
            self.publish(alert)

    def publish(self, alert: Alert) -> None:
        """Deliver `alert` in the background; never raises, never waits."""
        if not self._config.enabled:
            return
        if len(self._tasks) >= MAX_PENDING:
            log.warning("notification dropped: %d pending", len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(self._deliver(alert), name="notify")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, seconds: float = 10.0) -> None:
        """Wait (bounded) for the alerts in flight."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=seconds)

    async def close(self) -> None:
        """Finish what is in flight (bounded), then give up on the rest."""
        await self.drain()
        for task in list(self._tasks):
            task.cancel()

    def _wanted(self, alert: Alert, settings: OrgNotificationSettings | None) -> tuple[bool, list[str], int]:
        """Whether the org wants this event for this pipeline, its recipients and its cooldown."""
        c = self._config
        defaults = c.email.default_recipients if c.email else []
        if settings is None:
            return alert.event in c.events, list(defaults), c.cooldown_seconds
        events, recipients = settings.events, settings.recipients or list(defaults)
        per_pipeline = settings.pipelines.get(alert.pipeline_key) or {}
        if per_pipeline.get("muted"):
            return False, [], settings.cooldown_seconds
        events = per_pipeline.get("events") or events
        recipients = per_pipeline.get("recipients") or recipients
        return alert.event in events, list(recipients), settings.cooldown_seconds

    async def _deliver(self, alert: Alert) -> None:
        try:
            await self._deliver_unsafe(alert)
        except Exception:  # nothing here may reach the run
            log.exception("notification failed unexpectedly")

    async def _log(self, alert: Alert, channel: str, outcome: str, reason: str, attempts: int = 0) -> None:
        metrics.labelled(metrics.NOTIFICATIONS, channel or "-", outcome).inc()
        await self._store.log(
            alert.org_slug, alert.pipeline_key, alert.event, channel, alert.run_id, outcome, reason, attempts
        )

    async def _deliver_unsafe(self, alert: Alert) -> None:
        settings = await self._store.settings(alert.org_slug)
        wanted, recipients, cooldown = self._wanted(alert, settings)
        if not wanted:
            await self._log(alert, "", "SUPPRESSED", "EVENT_NOT_WANTED")
            return
        if not await self._store.claim(alert.org_slug, alert.pipeline_key, alert.event, cooldown):
            await self._log(alert, "", "SUPPRESSED", "COOLDOWN")
            return
        message = render(alert, self._config)
        sends: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self._email is not None and recipients:
            email = self._email
            sends.append(("EMAIL", lambda: email.send(recipients, message)))
        slack = self._slack
        if slack is not None and settings is not None and settings.slack_webhook:
            sends.append(("SLACK", lambda: slack.post(alert.org_slug, message)))
        if not sends:
            await self._log(alert, "", "SUPPRESSED", "NO_CHANNEL")
            return
        await asyncio.gather(*(self._attempts(alert, channel, send) for channel, send in sends))

    async def _attempts(self, alert: Alert, channel: str, send: Callable[[], Awaitable[None]]) -> None:
        attempts = 0
        while True:
            attempts += 1
            try:
                await send()
            except DeliveryError as exc:
                if exc.transient and attempts < self._config.max_attempts:
                    await self._sleep(self._config.backoff_seconds * 2 ** (attempts - 1))
                    continue
                log.warning("notification %s to %s failed: %s", alert.event, channel, exc.reason)
                await self._log(alert, channel, "FAILED", exc.reason, attempts)
                return
            await self._log(alert, channel, "SENT", "", attempts)
            return
