"""`pipeline-service saas import`: CSV and JSON lines, all or nothing, errors naming line and column."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from server import app
from server.errors import InvalidInputError
from server.localstack.emulator import Emulator
from server.saas import import_plans, parse_plans
from server.settings import Settings
from tests.conftest import make_org
from tests.integration.cli_runner import run_cli

HEADER = (
    "subscription_id,provider,plan_name,category,status,start_date,end_date,billing_cycle,pricing_model,"
    "unit_price,seats,currency,discount_type,discount_value,billing_anchor_day,contract_id,tags"
)
GOOD = [
    "p1,slack,Pro,Business Applications,Active ,2025-01-15,,MONTHLY,per_seat,7.123456789,3,usd,,,,C1,"
    '"{""team"": ""ops""}"',
    "p2,zoom,Biz,,cancelled,2025-02-01,2025-06-30,annual,flat_fee,1200,,EUR,percent,12.5,31,,",
]


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_rows_are_validated_and_normalised(tmp_path: Path) -> None:
    plans = parse_plans(write(tmp_path, "plans.csv", [HEADER, *GOOD]))
    assert [p.subscription_id for p in plans] == ["p1", "p2"]
    assert plans[0].status == "active" and plans[0].billing_cycle == "monthly" and plans[0].currency == "USD"
    assert plans[0].unit_price == Decimal("7.123456789") and plans[0].tags == {"team": "ops"}
    assert plans[1].discount_value == Decimal("12.5") and plans[1].billing_anchor_day == 31


def test_bad_rows_name_line_and_column_and_nothing_is_returned(tmp_path: Path) -> None:
    bad = [
        HEADER,
        GOOD[0],
        "p3,x,y,,active,2025-13-01,,monthly,per_seat,1,1,USD,,,,,",
        "p4,x,y,,active,2025-01-01,2024-01-01,monthly,per_seat,1,1,USD,,,,,",
        "p5,x,y,,active,2025-01-01,,hourly,per_seat,1.0000000001,1,US,percent,120,40,,",
        GOOD[0],
    ]
    with pytest.raises(InvalidInputError) as caught:
        parse_plans(write(tmp_path, "bad.csv", bad))
    fields = {v.field for v in caught.value.violations}
    assert "line 3, column start_date" in fields
    assert "line 4, column row" in fields or any(f.startswith("line 4") for f in fields)
    assert {
        "line 5, column billing_cycle",
        "line 5, column unit_price",
        "line 5, column currency",
        "line 5, column billing_anchor_day",
    } <= fields
    assert "line 6, column subscription_id" in fields  # duplicate of line 2
    assert "nothing imported" in caught.value.message


def test_json_lines(tmp_path: Path) -> None:
    rows = [
        {
            "subscription_id": "j1",
            "provider": "notion",
            "plan_name": "Team",
            "status": "active",
            "start_date": "2025-03-01",
            "billing_cycle": "quarterly",
            "pricing_model": "flat_fee",
            "unit_price": "300.000000001",
            "currency": "USD",
            "discount_type": "fixed",
            "discount_value": "10",
        }
    ]
    plans = parse_plans(write(tmp_path, "plans.jsonl", [json.dumps(r) for r in rows]))
    assert plans[0].unit_price == Decimal("300.000000001")
    with pytest.raises(InvalidInputError) as caught:
        parse_plans(
            write(tmp_path, "broken.jsonl", [json.dumps(rows[0]), "{nope", json.dumps({**rows[0], "x": 1})])
        )
    assert caught.value.violations[0].field == "line 2"


async def test_import_replaces_plans_with_the_same_id(service: app.Service, tmp_path: Path) -> None:
    org = await make_org(service, "saasimp")
    plans = parse_plans(write(tmp_path, "plans.csv", [HEADER, *GOOD]))
    assert await import_plans(service.warehouse, org.dataset, plans) == 2
    await import_plans(service.warehouse, org.dataset, plans[:1])
    table = service.warehouse.table_ref(org.dataset, "saas_subscription_plans")
    rows = await service.warehouse.query(
        f"SELECT subscription_id, unit_price, JSON_VALUE(tags, '$.team') AS team FROM {table} "
        "ORDER BY subscription_id"
    )
    assert [r["subscription_id"] for r in rows] == ["p1", "p2"]
    assert [r["team"] for r in rows] == ["ops", None]  # tags are stored as a JSON object, not a string
    assert rows[0]["unit_price"] == Decimal("7.123456789")


async def test_cli_import_is_all_or_nothing(
    service: app.Service, settings: Settings, emulator: Emulator, tmp_path: Path
) -> None:
    org = await make_org(service, "saascli")

    async def run(*args: str) -> tuple[int, dict[str, object]]:
        code, out = await run_cli(settings, emulator, *args)
        return code, json.loads(out)

    code, body = await run(
        "saas", "import", org.slug, str(write(tmp_path, "bad.csv", [HEADER, GOOD[0], "p9,,,,,,,,,,,,,,,,"]))
    )
    assert code == 1 and body["error"] == "INVALID_PLAN"
    assert any(v["field"] == "line 3, column provider" for v in body["violations"])  # type: ignore[union-attr]
    table = service.warehouse.table_ref(org.dataset, "saas_subscription_plans")
    assert (await service.warehouse.query(f"SELECT COUNT(*) AS n FROM {table}"))[0]["n"] == 0
    code, body = await run("saas", "import", org.slug, str(write(tmp_path, "good.csv", [HEADER, *GOOD])))
    assert code == 0 and body["plans_loaded"] == 2
    assert (await service.warehouse.query(f"SELECT COUNT(*) AS n FROM {table}"))[0]["n"] == 2
    code, body = await run("saas", "import", "no_such_org", str(tmp_path / "good.csv"))
    assert code == 1 and body["error"] == "ORG_NOT_FOUND"
