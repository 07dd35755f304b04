"""`NotificationService`: thin servicer over the org's notification settings and log."""

from __future__ import annotations

from typing import Any

from grpc import aio

from cloudact.pipeline.v1 import notification_service_pb2 as pb
from cloudact.pipeline.v1 import notification_service_pb2_grpc
from server.api.convert import timestamp
from server.api.guard import principal_name
from server.api.paging import decode_token, encode_token, invalid_token, page_size
from server.errors import FieldViolation, InvalidInputError
from server.notify.config import EVENTS, NotificationConfig
from server.notify.webhooks import SlackWebhooks
from server.pipelines.catalog import PipelineCatalog
from server.state.notifications import NotificationStore, OrgNotificationSettings

MAX_COOLDOWN = 7 * 86400


def settings_message(
    settings: OrgNotificationSettings | None, defaults: NotificationConfig
) -> pb.NotificationSettings:
    """The proto form of an org's settings (the global defaults when it has none)."""
    if settings is None:
        return pb.NotificationSettings(
            recipients=defaults.email.default_recipients if defaults.email else [],
            events=list(defaults.events),
            cooldown_seconds=defaults.cooldown_seconds,
            source="DEFAULT",
        )
    return pb.NotificationSettings(
        recipients=settings.recipients,
        slack_webhook_configured=bool(settings.slack_webhook),
        events=settings.events,
        cooldown_seconds=settings.cooldown_seconds,
        pipelines=[
            pb.PipelineNotifications(
                pipeline=key,
                muted=bool(o.get("muted")),
                events=o.get("events") or [],
                recipients=o.get("recipients") or [],
            )
            for key, o in sorted(settings.pipelines.items())
        ],
        source="ORG",
        update_time=timestamp(settings.updated_at),
    )


def _check_events(field: str, events: list[str], bad: list[FieldViolation]) -> None:
    for i, event in enumerate(events):
        if event not in EVENTS:
            bad.append(FieldViolation(f"{field}[{i}]", "one of " + ", ".join(EVENTS)))


def _check_recipients(field: str, recipients: list[str], bad: list[FieldViolation]) -> None:
    for i, address in enumerate(recipients):
        local, at, domain = address.partition("@")
        if not (local and at and "." in domain) or any(c.isspace() or c in "<>,;\"'" for c in address):
            bad.append(FieldViolation(f"{field}[{i}]", "an e-mail address"))


class NotificationServicer(notification_service_pb2_grpc.NotificationServiceServicer):
    """An org's notification settings and log."""

    def __init__(
        self,
        store: NotificationStore,
        webhooks: SlackWebhooks,
        catalog: PipelineCatalog,
        defaults: NotificationConfig,
    ) -> None:
        self._store = store
        self._webhooks = webhooks
        self._catalog = catalog
        self._defaults = defaults

    async def GetNotificationSettings(
        self, request: pb.GetNotificationSettingsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetNotificationSettingsResponse:
        settings = await self._store.settings(request.org_slug)
        return pb.GetNotificationSettingsResponse(settings=settings_message(settings, self._defaults))

    async def UpdateNotificationSettings(
        self, request: pb.UpdateNotificationSettingsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.UpdateNotificationSettingsResponse:
        bad: list[FieldViolation] = []
        _check_recipients("recipients", list(request.recipients), bad)
        _check_events("events", list(request.events), bad)
        if not 0 <= request.cooldown_seconds <= MAX_COOLDOWN:
            bad.append(FieldViolation("cooldown_seconds", f"0 to {MAX_COOLDOWN}"))
        url = request.slack_webhook_url
        if url and not self._webhooks.allowed(url):
            bad.append(
                FieldViolation("slack_webhook_url", "an incoming-webhook URL on the Slack provider's host")
            )
        known = {c.key for c in self._catalog.all()}
        pipelines: dict[str, dict[str, Any]] = {}
        for i, p in enumerate(request.pipelines):
            if p.pipeline not in known:
                bad.append(
                    FieldViolation(f"pipelines[{i}].pipeline", "not a pipeline (provider/domain/pipeline)")
                )
            _check_events(f"pipelines[{i}].events", list(p.events), bad)
            _check_recipients(f"pipelines[{i}].recipients", list(p.recipients), bad)
            pipelines[p.pipeline] = {
                "muted": p.muted,
                "events": list(p.events),
                "recipients": list(p.recipients),
            }
        if bad:
            raise InvalidInputError(
                "invalid notification settings", bad, reason="INVALID_NOTIFICATION_SETTINGS"
            )
        current = await self._store.settings(request.org_slug)
        reference = current.slack_webhook if current else ""
        if url:
            reference = await self._webhooks.put(request.org_slug, url)
        elif request.clear_slack_webhook and reference:
            await self._webhooks.delete(request.org_slug, reference)
            reference = ""
        saved = await self._store.put_settings(
            OrgNotificationSettings(
                request.org_slug,
                list(request.recipients),
                list(request.events) or list(EVENTS),
                request.cooldown_seconds,
                pipelines,
                reference,
                principal_name(),
            )
        )
        return pb.UpdateNotificationSettingsResponse(settings=settings_message(saved, self._defaults))

    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListNotificationsResponse:
        size = page_size(request.page_size, default=50, maximum=500)
        after = decode_token(request.page_token)
        if after and not after.isdigit():
            raise invalid_token()
        rows = await self._store.entries(
            request.org_slug, before=int(after) if after else None, limit=size + 1
        )
        page = rows[:size]
        return pb.ListNotificationsResponse(
            entries=[
                pb.NotificationLogEntry(
                    id=e.id,
                    pipeline=e.pipeline_key,
                    event=e.event,
                    channel=e.channel,
                    run_id=e.run_id,
                    outcome=e.outcome,
                    reason=e.reason,
                    attempts=e.attempts,
                    time=timestamp(e.at),
                )
                for e in page
            ],
            next_page_token=encode_token(str(page[-1].id)) if len(rows) > size else "",
        )
