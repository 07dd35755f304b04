"""SchedulerService through Envoy (REST) and gRPC on the session's server: effective schedules, overrides
with validated cron and timezone, a backfill that runs (one run per day, bounded), cancel, the root-key
trigger (idempotent) and status, and the auth rules."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from server import app
from tests.conftest import ROOT_HEADERS, Org, make_org

BASE = "/api/v1/scheduler"


async def call(http: aiohttp.ClientSession, method: str, path: str, headers: dict[str, str], **kw: Any):
    async with http.request(method, path, headers=headers, **kw) as r:
        return r.status, await r.json()


async def test_schedules_override_and_back_to_default(
    http: aiohttp.ClientSession, service: app.Service
) -> None:
    org = await make_org(service, "schedapi")
    status, body = await call(http, "GET", f"{BASE}/{org.slug}/schedules", org.headers)
    assert status == 200
    by_key = {f"{s['provider']}/{s['domain']}/{s['pipeline']}": s for s in body["schedules"]}
    nightly = by_key["engine/runs/nightly"]
    assert (nightly["source"], nightly["cron"], nightly["timezone"], nightly["enabled"]) == (
        "DEFAULT",
        "30 2 * * *",
        "America/New_York",
        True,
    )
    assert datetime.fromisoformat(nightly["next_run_time"].replace("Z", "+00:00")) > datetime.now(UTC)
    assert by_key["engine/runs/quick"]["source"] == "NONE"

    path = f"{BASE}/{org.slug}/schedules/engine/runs/nightly"
    status, body = await call(
        http, "PUT", path, org.headers, json={"cron": "*/5 * * * *", "timezone": "Mars/X"}
    )
    assert status == 400
    fields = {v["field"] for d in body["details"] if "field_violations" in d for v in d["field_violations"]}
    assert fields == {"cron", "timezone"}, body  # too frequent, and not a zone
    status, body = await call(
        http, "PUT", path, org.headers, json={"cron": "0 6 * * *", "parameters": {"Bad-Key": "x"}}
    )
    assert status == 400 and "parameters[Bad-Key]" in str(body)
    status, body = await call(
        http, "PUT", path, org.headers, json={"cron": "0 6 * * *", "parameters": {"date": "2999-01-01"}}
    )
    assert status == 400 and "date" in str(body["details"])  # no scheduled run could start with it
    status, body = await call(http, "PUT", path, org.headers, json={"cron": "0 99 * * *"})
    assert status == 400 and "cron" in str(body) and "99" not in body["message"]
    status, body = await call(
        http,
        "PUT",
        path,
        org.headers,
        json={"cron": "0 6 * * 1", "timezone": "Europe/Berlin", "enabled": False},
    )
    assert status == 200 and body["schedule"]["source"] == "OVERRIDE" and not body["schedule"]["enabled"]
    status, body = await call(http, "DELETE", path, org.headers)
    assert status == 200 and body["schedule"]["source"] == "DEFAULT"
    status, body = await call(http, "DELETE", path, org.headers)
    assert status == 404 and body["details"][0]["reason"] == "SCHEDULE_OVERRIDE_NOT_FOUND"


async def test_backfill_runs_each_day_once(http: aiohttp.ClientSession, service: app.Service) -> None:
    org = await make_org(service, "schedapi")
    end = datetime.now(UTC).date() - timedelta(days=1)
    request = {
        "pipeline": "engine/runs/nightly",
        "start_date": (end - timedelta(days=4)).isoformat(),
        "end_date": end.isoformat(),
        "max_concurrency": 2,
    }
    status, body = await call(http, "POST", f"{BASE}/{org.slug}/backfills", org.headers, json=request)
    assert status == 200 and body["queued_now"] == 5 and body["backfill"]["total"] == 5, body
    backfill_id = body["backfill"]["backfill_id"]
    status, again = await call(http, "POST", f"{BASE}/{org.slug}/backfills", org.headers, json=request)
    assert status == 200 and again["queued_now"] == 0 and again["backfill"]["backfill_id"] == backfill_id
    async with asyncio.timeout(30):
        while True:
            status, body = await call(http, "GET", f"{BASE}/{org.slug}/backfills/{backfill_id}", org.headers)
            if body["backfill"]["succeeded"] == 5:
                break
            assert body["backfill"]["failed"] == 0, body
            await asyncio.sleep(0.1)
    runs = await service.runs.list(
        org.slug, pipeline_key="engine/runs/nightly", state="", before=None, limit=50
    )
    assert sorted(r.parameters["date"] for r in runs) == sorted(
        (end - timedelta(days=i)).isoformat() for i in range(5)
    )
    status, body = await call(
        http, "POST", f"{BASE}/{org.slug}/backfills", org.headers, json={**request, "end_date": "2999-01-01"}
    )
    assert status == 400 and "end_date" in str(body)


async def test_backfill_cancel_and_other_orgs(
    http: aiohttp.ClientSession, service: app.Service, acme: Org
) -> None:
    org = await make_org(service, "schedapi")
    status, body = await call(
        http,
        "POST",
        f"{BASE}/{org.slug}/backfills",
        org.headers,
        json={
            "pipeline": "engine/runs/sleepy",
            "start_date": "2025-01-01",
            "end_date": "2025-01-20",
            "max_concurrency": 1,
        },
    )
    assert status == 200
    backfill_id = body["backfill"]["backfill_id"]
    status, body = await call(http, "GET", f"{BASE}/{org.slug}/backfills/{backfill_id}", acme.headers)
    assert status == 403  # another org's key
    status, body = await call(http, "GET", f"{BASE}/{acme.slug}/backfills/{backfill_id}", acme.headers)
    assert status == 404  # never revealed
    status, body = await call(http, "DELETE", f"{BASE}/{org.slug}/backfills/{backfill_id}", org.headers)
    assert status == 200 and body["backfill"]["is_cancelled"]
    assert body["backfill"]["queued"] == 0
    async with asyncio.timeout(15):
        while True:
            status, body = await call(http, "GET", f"{BASE}/{org.slug}/backfills/{backfill_id}", org.headers)
            if body["backfill"]["running"] == 0:
                break
            await asyncio.sleep(0.1)
    assert body["backfill"]["succeeded"] == 0 and body["backfill"]["cancelled"] == 20


async def test_trigger_and_status_need_the_root_key(http: aiohttp.ClientSession, acme: Org) -> None:
    status, body = await call(http, "POST", f"{BASE}/trigger", acme.headers, json={})
    assert status == 403 and body["details"][0]["reason"] == "ROOT_KEY_REQUIRED"
    status, first = await call(http, "POST", f"{BASE}/trigger", ROOT_HEADERS, json={})
    assert status == 200 and {"due", "enqueued", "seconds"} <= first.keys()
    status, again = await call(http, "POST", f"{BASE}/trigger", ROOT_HEADERS, json={})
    assert status == 200 and again["enqueued"] == 0  # nothing new since the first trigger
    status, body = await call(http, "GET", f"{BASE}/status", ROOT_HEADERS)
    assert status == 200 and {"due", "queued", "running", "failed_today", "retries_pending"} <= body.keys()
    assert body["last_tick_time"]
