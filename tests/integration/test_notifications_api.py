"""NotificationService through Envoy (REST) on the session's server: defaults, validated updates that need
the admin scope and never echo the webhook, per-pipeline settings, the paged log."""

from __future__ import annotations

from typing import Any

import aiohttp

from server import app
from tests.conftest import make_org

BASE = "/api/v1/notifications"


async def call(
    http: aiohttp.ClientSession, method: str, path: str, headers: dict[str, str], **kw: Any
) -> tuple[int, Any]:
    async with http.request(method, path, headers=headers, **kw) as r:
        return r.status, await r.json()


def fields(body: Any) -> set[str]:
    return {v["field"] for d in body["details"] if "field_violations" in d for v in d["field_violations"]}


async def test_settings_need_the_admin_scope_and_hide_the_webhook(
    http: aiohttp.ClientSession, service: app.Service
) -> None:
    org = await make_org(service, "notifapi")
    admin = await service.orgs.create_key(org.slug, scopes=("pipelines:read", "pipelines:admin"))
    admin_headers = {"X-API-Key": admin.api_key}
    path = f"{BASE}/{org.slug}/settings"
    status, body = await call(http, "GET", path, org.headers)
    assert status == 200 and body["settings"]["source"] == "DEFAULT"
    assert set(body["settings"]["events"]) == {
        "RUN_FAILED",
        "RUN_TIMED_OUT",
        "RUN_RECOVERED",
        "QUOTA_EXCEEDED",
    }
    good = {
        "recipients": ["ops@acme.test"],
        "slack_webhook_url": "https://hooks.slack.com/services/T0/B0/secretpart",
        "events": ["RUN_FAILED", "RUN_RECOVERED"],
        "cooldown_seconds": 900,
        "pipelines": [{"pipeline": "engine/runs/quick", "muted": True}],
    }
    status, body = await call(http, "PUT", path, org.headers, json=good)
    assert status == 403 and body["details"][0]["reason"] == "SCOPE_MISSING"
    bad = {
        "recipients": ["not-an-address"],
        "slack_webhook_url": "ftp://x",
        "events": ["RUN_EXPLODED"],
        "cooldown_seconds": -1,
        "pipelines": [{"pipeline": "no/such/pipeline", "events": ["NOPE"]}],
    }
    status, body = await call(http, "PUT", path, admin_headers, json=bad)
    assert status == 400 and fields(body) == {
        "recipients[0]",
        "slack_webhook_url",
        "events[0]",
        "cooldown_seconds",
        "pipelines[0].pipeline",
        "pipelines[0].events[0]",
    }, body
    assert "ftp://x" not in str(body) and "not-an-address" not in str(body)
    status, body = await call(http, "PUT", path, admin_headers, json=good)
    assert status == 200 and body["settings"]["slack_webhook_configured"], body
    assert org.slug in await service.vault.store.holders("slack")  # an encrypted credential of the org
    stored = await service.vault.store.load(org.slug, "slack", "notifications")
    assert stored.secret("webhook_url").get_secret_value() == good["slack_webhook_url"]
    assert "secretpart" not in str(body)
    assert body["settings"]["pipelines"] == [
        {"pipeline": "engine/runs/quick", "muted": True, "events": [], "recipients": []}
    ]
    status, body = await call(http, "PUT", path, admin_headers, json={**good, "slack_webhook_url": ""})
    assert status == 200 and body["settings"]["slack_webhook_configured"]  # kept
    status, body = await call(
        http, "PUT", path, admin_headers, json={**good, "slack_webhook_url": "", "clear_slack_webhook": True}
    )
    assert status == 200 and not body["settings"]["slack_webhook_configured"]
    assert org.slug not in await service.vault.store.holders("slack")  # the credential itself is gone
    for url in (
        "http://hooks.slack.com/services/T0/B0/x",  # not the provider's scheme
        "https://169.254.169.254/services/T0/B0/x",  # not the provider's host
        "https://user@hooks.slack.com/services/T0/B0/x",
        "https://hooks.slack.com/other/path",
    ):
        status, body = await call(http, "PUT", path, admin_headers, json={**good, "slack_webhook_url": url})
        assert status == 400 and fields(body) == {"slack_webhook_url"} and url not in str(body), url
    status, body = await call(http, "GET", path, org.headers)
    assert (
        status == 200 and body["settings"]["source"] == "ORG" and body["settings"]["cooldown_seconds"] == 900
    )


async def test_the_log_is_paged_newest_first(http: aiohttp.ClientSession, service: app.Service) -> None:
    org = await make_org(service, "notifapi")
    for n in range(3):
        await service.state.notifications.log(
            org.slug, "engine/runs/failing", "RUN_FAILED", "EMAIL", f"run{n}", "FAILED", "SMTP_TIMEOUT", 3
        )
    status, body = await call(http, "GET", f"{BASE}/{org.slug}/log?page_size=2", org.headers)
    assert status == 200 and [e["run_id"] for e in body["entries"]] == ["run2", "run1"]
    assert body["entries"][0]["reason"] == "SMTP_TIMEOUT" and body["entries"][0]["attempts"] == 3
    token = body["next_page_token"]
    status, body = await call(
        http, "GET", f"{BASE}/{org.slug}/log?page_size=2&page_token={token}", org.headers
    )
    assert (
        status == 200 and [e["run_id"] for e in body["entries"]] == ["run0"] and not body["next_page_token"]
    )
    status, body = await call(http, "GET", f"{BASE}/{org.slug}/log?page_token=garbage", org.headers)
    assert status == 400 and body["details"][0]["reason"] == "INVALID_PAGE_TOKEN"
