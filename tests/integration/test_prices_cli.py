"""`pipeline-service prices ...` against the session's emulator, and an override changing a FOCUS price."""

from __future__ import annotations

import json
import uuid

from server import app
from server.localstack.emulator import Emulator
from server.settings import Settings
from tests.conftest import make_org
from tests.integration.cli_runner import run_cli


async def test_snapshot_and_overrides_through_the_cli(
    service: app.Service, settings: Settings, emulator: Emulator
) -> None:
    code, out = await run_cli(settings, emulator, "prices", "snapshot")
    assert code == 0, out
    assert json.loads(out) == {
        "package": "genai-prices",
        "version": "0.2.3",
        "rows_loaded": 0,
    }  # at bootstrap
    catalog = service.warehouse.table_ref(settings.meta_dataset, "genai_price_catalog")
    counted = await service.warehouse.query(f"SELECT COUNT(*) AS n, MIN(snapshot_date) AS d FROM {catalog}")
    assert counted[0]["n"] > 1000 and counted[0]["d"] is not None

    org = await make_org(service, "prices")
    code, out = await run_cli(
        settings,
        emulator,
        "prices",
        "override",
        org.slug,
        "openai",
        "gpt-5.5*",
        "--discount-pct",
        "12.5",
        "--token-class",
        "output",
        "--from",
        "2026-11-01",
    )
    assert code == 0, out
    created = json.loads(out)
    assert created["override_id"].startswith("ovr_") and created["discount_pct"] == "12.5"
    code, out = await run_cli(settings, emulator, "prices", "overrides", org.slug)
    assert [o["override_id"] for o in json.loads(out)["overrides"]] == [created["override_id"]]
    # refused: both a rate and a discount, an unknown token class (nothing is stored)
    code, out = await run_cli(
        settings,
        emulator,
        "prices",
        "override",
        org.slug,
        "openai",
        "gpt-5",
        "--rate",
        "1",
        "--discount-pct",
        "1",
        "--token-class",
        "tokens",
    )
    error = json.loads(out)
    assert code == 1 and error["error"] == "INVALID_PRICE_OVERRIDE"
    assert {v["field"] for v in error["violations"]} == {"rate", "token_class"}
    code, out = await run_cli(
        settings, emulator, "prices", "override", f"nope_{uuid.uuid4().hex[:6]}", "openai", "x", "--rate", "1"
    )
    assert code == 1 and json.loads(out)["error"] == "ORG_NOT_FOUND"
    code, out = await run_cli(
        settings, emulator, "prices", "delete-override", org.slug, created["override_id"]
    )
    assert code == 0
    code, out = await run_cli(
        settings, emulator, "prices", "delete-override", org.slug, created["override_id"]
    )
    assert code == 1 and json.loads(out)["error"] == "OVERRIDE_NOT_FOUND"
