"""The console script against the session's emulator and PostgreSQL: org and key commands, query, configs
validate, db status, upgrade and prune."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
from pydantic import SecretStr

from server import app, devstack, meta
from server.localstack.emulator import Emulator
from server.localstack.postgres import Postgres
from server.orgs import OrgRepository
from server.settings import Settings
from server.state import migrate
from tests.conftest import scratch_database
from tests.integration.cli_runner import run_cli

cli = run_cli


async def test_org_lifecycle_through_the_cli_and_the_api(
    settings: Settings, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    slug = f"cli_{uuid.uuid4().hex[:8]}"
    code, out = await cli(settings, emulator, "org", "create", slug, "--fiscal-year-start-month", "4")
    assert code == 0, out
    created = json.loads(out)
    assert created["org_slug"] == slug and created["dataset"] == f"{slug}_local"
    assert created["api_key"].startswith("ca_") and len(created["api_key"]) > 40

    async with http.get("/api/v1/pipelines", headers={"X-API-Key": created["api_key"]}) as r:
        assert r.status == 200

    code, out = await cli(settings, emulator, "org", "create", slug)
    assert code == 1 and json.loads(out)["error"] == "ORG_EXISTS"

    code, out = await cli(settings, emulator, "org", "keys", "create", slug, "--scope", "pipelines:read")
    second = json.loads(out)
    assert code == 0 and second["scopes"] == ["pipelines:read"]

    code, out = await cli(settings, emulator, "org", "keys", "revoke", second["api_key_id"])
    assert code == 0 and json.loads(out)["revoked"] == second["api_key_id"]
    await asyncio.sleep(settings.auth_cache_ttl_seconds + 0.2)
    async with http.get("/api/v1/pipelines", headers={"X-API-Key": second["api_key"]}) as r:
        assert r.status == 401
    code, out = await cli(settings, emulator, "org", "keys", "revoke", second["api_key_id"])
    assert code == 1 and json.loads(out)["error"] == "API_KEY_NOT_FOUND"

    code, out = await cli(
        settings,
        emulator,
        "query",
        f"SELECT org_slug, fiscal_year_start_month FROM {settings.meta_dataset}.org_profiles "
        f"WHERE org_slug = '{slug}'",
    )
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {"org_slug": slug, "fiscal_year_start_month": 4}
    ]

    code, out = await cli(settings, emulator, "org", "create", "Bad-Slug")
    body = json.loads(out)
    assert code == 1 and body["violations"][0]["field"] == "org_slug"


async def test_configs_validate(settings: Settings, emulator: Emulator, tmp_path: Path) -> None:
    code, out = await cli(settings, emulator, "configs", "validate")
    assert code == 0 and "engine/runs/quick" in json.loads(out)["valid"]
    bad = settings.configs_dir / "engine" / "runs" / "quick.yml"
    code, out = await cli(settings, emulator, "configs", "validate", str(bad))
    assert code == 0 and json.loads(out)["valid"] == ["engine/runs/quick"]
    folder = tmp_path / "acme" / "usage"
    folder.mkdir(parents=True)
    (folder / "typo.yml").write_text(
        "pipeline_id: x1\nname: n\nsteps: [{step_id: a, ps_type: generic.noop, typo: 1}]\n"
    )
    code, out = await cli(settings, emulator, "configs", "validate", str(folder / "typo.yml"))
    body = json.loads(out)
    assert code == 1 and body["error"] == "INVALID_PIPELINE_CONFIG"
    assert body["violations"][0]["field"] == "acme/usage/typo.yml:steps.0.typo"
    (folder / "badcfg.yml").write_text(
        "pipeline_id: x2\nname: n\nsteps: [{step_id: a, ps_type: generic.noop, config: {nope: 1}}]\n"
    )
    code, out = await cli(settings, emulator, "configs", "validate", str(folder / "badcfg.yml"))
    body = json.loads(out)
    assert code == 1 and body["violations"][0]["field"].startswith("acme/usage/badcfg.yml:steps.0.config")
    (folder / "unknown.yml").write_text(
        "pipeline_id: x3\nname: n\nsteps: [{step_id: a, ps_type: nope.thing}]\n"
    )
    code, out = await cli(settings, emulator, "configs", "validate", str(folder / "unknown.yml"))
    assert code == 1 and "nope.thing" in json.loads(out)["message"]


async def test_demo_org_is_created_once_with_its_plans(service: app.Service, tmp_path: Path) -> None:
    """What `make run` does on its first and later starts (the demo org lives in its own meta dataset)."""
    meta_dataset = f"demo_meta_{uuid.uuid4().hex[:8]}"
    await meta.bootstrap(service.warehouse, meta_dataset, service.settings.schemas_dir)
    orgs = OrgRepository(
        service.warehouse, meta_dataset, f"d{uuid.uuid4().hex[:6]}", service.settings.schemas_dir
    )
    first = await devstack.demo_org(orgs, tmp_path)
    again = await devstack.demo_org(orgs, tmp_path)
    assert first == again and first["org_slug"] == "demo"
    assert (tmp_path / "demo-org.json").stat().st_mode & 0o777 == 0o600
    plans = service.warehouse.table_ref(first["dataset"], "saas_subscription_plans")
    rows = await service.warehouse.query(f"SELECT status, COUNT(*) AS n FROM {plans} GROUP BY status")
    counts = {r["status"]: r["n"] for r in rows}
    assert counts == {"active": 7, "cancelled": 1, "pending": 1}  # seeded once, not twice
    await service.warehouse.delete_dataset(first["dataset"])
    await service.warehouse.delete_dataset(meta_dataset)


async def test_db_status_and_upgrade_on_a_fresh_database(
    settings: Settings, emulator: Emulator, postgres: Postgres
) -> None:
    async with scratch_database(postgres, "cli_db") as url:
        fresh = settings.model_copy(update={"database_url": SecretStr(url)})
        code, out = await cli(fresh, emulator, "db", "status")
        assert code == 0, out
        before = json.loads(out)
        versions = [m.version for m in migrate.available()]
        assert [m["version"] for m in before["migrations"]] == versions
        assert before["applied_now"] == [] and all(m["applied_at"] is None for m in before["migrations"])

        code, out = await cli(fresh, emulator, "db", "upgrade")
        assert code == 0, out
        assert json.loads(out)["applied_now"] == versions
        code, out = await cli(fresh, emulator, "db", "upgrade")
        after = json.loads(out)
        assert after["applied_now"] == [] and all(m["applied_at"] for m in after["migrations"])

        db = await asyncpg.connect(url)
        try:
            for run_id, ended in (("old", datetime(2020, 1, 1, tzinfo=UTC)), ("new", datetime.now(UTC))):
                await db.execute(
                    "INSERT INTO runs (run_id, org_slug, pipeline_key, pipeline_id, state, trigger, "
                    "parameters, dedupe_key, owner, create_time, end_time, exported) "
                    "VALUES ($1, 'acme', 'a/b/c', 'c', 'SUCCEEDED', 'API', '{}', $1, 'r', $2, $2, true)",
                    run_id,
                    ended,
                )
            code, out = await cli(fresh, emulator, "db", "prune")
            assert code == 0, out
            assert json.loads(out)["deleted"]["runs"] == 1
            assert [r["run_id"] for r in await db.fetch("SELECT run_id FROM runs")] == ["new"]
        finally:
            await db.close()
