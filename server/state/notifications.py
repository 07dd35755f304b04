"""The notifications' part of the state store (migrations/0003_notifications.sql): org settings, the
cooldown claim (one statement: the replica that moves `sent_at` sends, every other one is suppressed),
and the notification log."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg


@dataclass(frozen=True, slots=True)
class OrgNotificationSettings:
    """An org's notification settings."""

    org_slug: str
    recipients: list[str]
    events: list[str]
    cooldown_seconds: int
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    slack_webhook: str = ""  # a reference to the org's webhook credential
    updated_by: str = ""
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of the notification log."""

    id: int
    org_slug: str
    pipeline_key: str
    event: str
    channel: str
    run_id: str
    outcome: str
    reason: str
    attempts: int
    at: datetime


class NotificationStore:
    """Notification state on the state store's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def settings(self, org_slug: str) -> OrgNotificationSettings | None:
        """The org's settings, None if it never set any."""
        row = await self._pool.fetchrow("SELECT * FROM notification_settings WHERE org_slug = $1", org_slug)
        return OrgNotificationSettings(**dict(row)) if row else None

    async def put_settings(self, s: OrgNotificationSettings) -> OrgNotificationSettings:
        """Create or replace the org's settings."""
        row = await self._pool.fetchrow(
            "INSERT INTO notification_settings (org_slug, recipients, events, cooldown_seconds, pipelines, "
            "slack_webhook, updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (org_slug) DO UPDATE "
            "SET recipients = $2, events = $3, cooldown_seconds = $4, pipelines = $5, slack_webhook = $6, "
            "updated_by = $7, updated_at = clock_timestamp() RETURNING *",
            s.org_slug,
            s.recipients,
            s.events,
            s.cooldown_seconds,
            s.pipelines,
            s.slack_webhook,
            s.updated_by,
        )
        assert row is not None
        return OrgNotificationSettings(**dict(row))

    async def claim(self, org_slug: str, pipeline_key: str, event: str, cooldown_seconds: int) -> bool:
        """True for exactly one caller per cooldown window of (org, pipeline, event), over every replica."""
        row = await self._pool.fetchval(
            "INSERT INTO notification_cooldowns AS c VALUES ($1, $2, $3, clock_timestamp()) "
            "ON CONFLICT (org_slug, pipeline_key, event) DO UPDATE SET sent_at = clock_timestamp() "
            "WHERE c.sent_at <= clock_timestamp() - make_interval(secs => $4) RETURNING 1",
            org_slug,
            pipeline_key,
            event,
            float(cooldown_seconds),
        )
        return row is not None

    async def log(
        self,
        org_slug: str,
        pipeline_key: str,
        event: str,
        channel: str,
        run_id: str,
        outcome: str,
        reason: str,
        attempts: int,
    ) -> None:
        """Append a line to the notification log (reasons are bounded: 500 characters)."""
        await self._pool.execute(
            "INSERT INTO notification_log (org_slug, pipeline_key, event, channel, run_id, outcome, reason, "
            "attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            org_slug,
            pipeline_key,
            event,
            channel,
            run_id,
            outcome,
            reason[:500],
            attempts,
        )

    async def entries(self, org_slug: str, *, before: int | None, limit: int) -> list[LogEntry]:
        """The org's log, newest first, before the entry id `before`."""
        rows = await self._pool.fetch(
            "SELECT * FROM notification_log WHERE org_slug = $1 AND ($2::bigint IS NULL OR id < $2) "
            "ORDER BY id DESC LIMIT $3",
            org_slug,
            before,
            limit,
        )
        return [LogEntry(**dict(r)) for r in rows]
