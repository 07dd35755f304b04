"""Notifications against real stand-ins: an SMTP server in the test process (aiosmtpd, STARTTLS with a
self-signed certificate, AUTH required) and a Slack webhook receiver (aiohttp). Delivery and content,
SMTP auth failure / connection refused / timeout as logged failures, webhook retries, cooldown across two
replicas in PostgreSQL, settings per org and pipeline, the config's ${ENV_VAR} expansion, and a failing
scheduled run that notifies without being affected by a broken mail server."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from server import app
from server.http.client import HttpSettings, OutboundHttp
from server.localstack.postgres import Postgres
from server.localstack.process import free_port
from server.notify import config as notify_config
from server.notify.alert import Alert
from server.notify.config import EmailConfig, NotificationConfig
from server.notify.notifier import Notifier
from server.notify.webhooks import SlackWebhooks
from server.providers import ProviderRegistry
from server.state.notifications import LogEntry, OrgNotificationSettings
from server.state.store import StateStore
from tests.conftest import scratch_database
from tests.integration.standins import SmtpServer, Webhook, self_signed, silent_server

ORG = "notif_org"
ALERT = Alert(
    "RUN_FAILED",
    ORG,
    "engine/runs/failing",
    "0123456789abcdef0123456789abcdef",
    "FAILED",
    "WAREHOUSE_NOT_FOUND",
    "procedure sp_does_not_exist was not found",
    1,
)


@pytest.fixture
async def database(postgres: Postgres) -> AsyncIterator[str]:
    async with scratch_database(postgres, "notif") as url:
        yield url


@pytest.fixture
async def stores(database: str) -> AsyncIterator[Callable[[], Awaitable[StateStore]]]:
    made: list[StateStore] = []

    async def make() -> StateStore:
        store = await StateStore.connect(dsn=database, pool_size=4)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
async def smtp(tmp_path: Path) -> AsyncIterator[SmtpServer]:
    cert, key = self_signed(tmp_path)
    server = SmtpServer(cert, key)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    await hook.start()
    yield hook
    await hook.stop()


def make_config(smtp: SmtpServer, **email: object) -> NotificationConfig:
    fields: dict[str, object] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp.port,
        "security": "starttls",
        "username": "svc",
        "password": "s3cret",
        "sender": "pipelines@cloudact.test",
        "default_recipients": ["admin@cloudact.test"],
        "timeout_seconds": 1.0,
        "ca_file": str(smtp.cert),
    }
    fields.update(email)
    return NotificationConfig(
        enabled=True, email=EmailConfig(**fields), cooldown_seconds=3600, max_attempts=3, backoff_seconds=0.05
    )


@pytest.fixture
async def slack(service: app.Service, webhook: Webhook) -> AsyncIterator[SlackWebhooks]:
    """Webhooks kept as the orgs' encrypted `slack` credentials (the session's credential store) and
    posted through an outbound HTTP client whose `slack` provider points at the receiver."""
    registry = ProviderRegistry.load(
        service.settings.providers_file, {"PROVIDER_BASE_URL_SLACK": webhook.url.split("/services/")[0]}
    )
    http = OutboundHttp(
        registry, HttpSettings(max_attempts=3, backoff_initial=0.01, backoff_max=0.05, retry_budget=5)
    )
    yield SlackWebhooks(service.vault, http)
    await http.close()


def notifier(config: NotificationConfig, store: StateStore, slack: SlackWebhooks | None = None) -> Notifier:
    return Notifier(config, store.notifications, slack=slack)


def new_org() -> str:
    """An org of its own (the credential cache is keyed by org)."""
    return f"notif_{uuid.uuid4().hex[:8]}"


async def entries(store: StateStore, org: str = ORG) -> list[LogEntry]:
    return list(reversed(await store.notifications.entries(org, before=None, limit=100)))


async def test_email_over_starttls_with_auth_and_slack(
    stores: Callable[[], Awaitable[StateStore]], smtp: SmtpServer, webhook: Webhook, slack: SlackWebhooks
) -> None:
    store = await stores()
    org = new_org()
    reference = await slack.put(org, webhook.url)
    await store.notifications.put_settings(
        OrgNotificationSettings(org, ["ops@acme.test"], ["RUN_FAILED"], 600, {}, slack_webhook=reference)
    )
    assert webhook.url not in reference  # the settings hold the credential's id, not the URL
    n = notifier(make_config(smtp), store, slack)
    n.publish(dataclasses.replace(ALERT, org_slug=org))
    await n.drain()
    [mail] = smtp.received
    assert mail.tls and mail.user == "svc" and mail.recipients == ["ops@acme.test"]
    for text in (
        org,
        "engine/runs/failing",
        ALERT.run_id,
        "WAREHOUSE_NOT_FOUND",
        "Attempt: 1",
        f"/api/v1/pipelines/runs/{ALERT.run_id}",
        "grpcurl",
        "PipelineService/GetPipelineRun",
    ):
        assert text in mail.content, text
    [posted] = webhook.received
    assert ALERT.run_id in posted["text"] and "failed" in posted["text"]
    assert [(e.channel, e.outcome, e.attempts) for e in await entries(store, org)] in (
        [("EMAIL", "SENT", 1), ("SLACK", "SENT", 1)],
        [("SLACK", "SENT", 1), ("EMAIL", "SENT", 1)],
    )
    await n.close()


@pytest.mark.parametrize(
    ("case", "reason", "attempts"),
    [("auth", "SMTP_AUTH_FAILED", 1), ("refused", "SMTP_UNREACHABLE", 3), ("timeout", "SMTP_TIMEOUT", 3)],
)
async def test_smtp_failures_are_logged(
    stores: Callable[[], Awaitable[StateStore]], smtp: SmtpServer, case: str, reason: str, attempts: int
) -> None:
    store = await stores()
    silent = None
    if case == "auth":
        config = make_config(smtp, password="wrong")
    elif case == "refused":
        config = make_config(smtp, smtp_port=free_port())
    else:
        silent, port = await silent_server()
        config = make_config(smtp, smtp_port=port, timeout_seconds=0.3)
    n = notifier(config, store)
    loop = asyncio.get_running_loop()
    started = loop.time()
    n.publish(ALERT)
    assert loop.time() - started < 0.01  # handing off never waits for the mail server
    await n.drain()
    assert smtp.received == []
    [entry] = await entries(store)
    assert (entry.channel, entry.outcome, entry.reason, entry.attempts) == (
        "EMAIL",
        "FAILED",
        reason,
        attempts,
    )
    await n.close()
    if silent is not None:
        silent.close()


async def test_slack_retries_a_5xx_and_gives_up_on_a_4xx(
    stores: Callable[[], Awaitable[StateStore]], smtp: SmtpServer, webhook: Webhook, slack: SlackWebhooks
) -> None:
    store = await stores()
    org = new_org()
    reference = await slack.put(org, webhook.url)
    await store.notifications.put_settings(
        OrgNotificationSettings(org, [], ["RUN_FAILED", "RUN_TIMED_OUT"], 0, {}, slack_webhook=reference)
    )
    n = notifier(make_config(smtp).model_copy(update={"email": None}), store, slack)
    alert = dataclasses.replace(ALERT, org_slug=org)
    webhook.statuses = [500, 503]  # the HTTP client retries with backoff, then it arrives
    n.publish(alert)
    await n.drain()
    webhook.statuses = [404]  # refused: not retried
    n.publish(alert)
    await n.drain()
    got = [(e.channel, e.outcome, e.reason) for e in await entries(store, org)]
    assert got == [("SLACK", "SENT", ""), ("SLACK", "FAILED", "SLACK_PROVIDER_REJECTED")]
    assert len(webhook.received) == 1 and webhook.statuses == []
    await n.close()


async def test_cooldown_holds_across_two_replicas(
    stores: Callable[[], Awaitable[StateStore]], smtp: SmtpServer
) -> None:
    one, two = await stores(), await stores()
    a, b = notifier(make_config(smtp), one), notifier(make_config(smtp), two)
    for _ in range(5):
        a.publish(ALERT)
        b.publish(ALERT)
    await asyncio.gather(a.drain(), b.drain())
    assert len(smtp.received) == 1
    outcomes = [(e.outcome, e.reason) for e in await entries(one)]
    assert sorted(outcomes) == [("SENT", "")] + [("SUPPRESSED", "COOLDOWN")] * 9
    # Another event or pipeline has its own cooldown.
    a.publish(
        Alert("RUN_TIMED_OUT", ORG, ALERT.pipeline_key, ALERT.run_id, "TIMEOUT", "PIPELINE_TIMEOUT", "", 2)
    )
    await a.drain()
    assert len(smtp.received) == 2
    await a.close()
    await b.close()


async def test_org_settings_choose_events_and_mute_pipelines(
    stores: Callable[[], Awaitable[StateStore]], smtp: SmtpServer
) -> None:
    store = await stores()
    await store.notifications.put_settings(
        OrgNotificationSettings(
            ORG,
            ["ops@acme.test"],
            ["RUN_TIMED_OUT"],
            0,
            {
                "engine/runs/quiet": {"muted": True},
                "engine/runs/loud": {"events": ["RUN_FAILED"], "recipients": ["loud@acme.test"]},
            },
        )
    )
    n = notifier(make_config(smtp), store)
    for pipeline in ("engine/runs/failing", "engine/runs/quiet", "engine/runs/loud"):
        n.publish(Alert("RUN_FAILED", ORG, pipeline, ALERT.run_id, "FAILED", "X", "", 1))
        await n.drain()
    assert [m.recipients for m in smtp.received] == [["loud@acme.test"]]
    got = [(e.pipeline_key, e.outcome, e.reason) for e in await entries(store)]
    assert got == [
        ("engine/runs/failing", "SUPPRESSED", "EVENT_NOT_WANTED"),
        ("engine/runs/quiet", "SUPPRESSED", "EVENT_NOT_WANTED"),
        ("engine/runs/loud", "SENT", ""),
    ]
    await n.close()


def test_config_expands_env_and_names_what_is_missing(tmp_path: Path) -> None:
    path = Path(__file__).parents[2] / "configs" / "notifications" / "config.json"
    env = {
        "SMTP_HOST": "smtp.example.com",
        "SMTP_PORT": "587",
        "SMTP_SECURITY": "starttls",
        "SMTP_USERNAME": "svc",
        "SMTP_PASSWORD": "pw",
        "DEFAULT_ADMIN_EMAIL": "admin@example.com",
        "PUBLIC_REST_URL": "https://api.example.com",
        "PUBLIC_GRPC_ADDRESS": "grpc.example.com:443",
    }
    config = notify_config.load(path, env)
    assert config.email is not None and config.email.smtp_port == 587 and config.email.password == "pw"
    assert config.email.default_recipients == ["admin@example.com"]
    with pytest.raises(notify_config.NotificationConfigError, match=r"SMTP_PASSWORD \(for email.password\)"):
        notify_config.load(path, {k: v for k, v in env.items() if k != "SMTP_PASSWORD"})
    off = tmp_path / "off.json"
    off.write_text('{"enabled": false, "email": {"sender": "x@y.z", "password": "${NOT_SET}"}}')
    assert not notify_config.load(off, {}).email_on  # disabled: a missing variable is fine
    bad = tmp_path / "bad.json"
    bad.write_text('{"enabled": true, "email": {"sender": "x@y.z", "smtp_port": "${PORT}"}}')
    with pytest.raises(notify_config.NotificationConfigError, match="smtp_port"):
        notify_config.load(bad, {"PORT": "not-a-port"})
