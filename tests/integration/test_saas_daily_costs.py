"""`sp_calculate_saas_subscription_costs_daily` against the real emulator, checked row by row against an
independent Python model of the cost rules (exact `Decimal` arithmetic, ROUND_HALF_UP to 9 places).

Money is always read back from the target table (CALL results may lose decimals on the emulator), and the
prices have 9 decimals with periods of 7, 28-31, 90-92, 181-184 and 365-366 days, so every division has a
long expansion. Each test uses its own orgs; the procedure is synced from the real `procedures/` folder.
"""

from __future__ import annotations

import calendar
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import pytest

from server import app
from tests.conftest import warehouse_rejects

PROCEDURE = "sp_calculate_saas_subscription_costs_daily"
PLANS = "saas_subscription_plans"
COSTS = "saas_subscription_plan_costs_daily"
NANO = Decimal("0.000000001")
MONTHS = {"monthly": 1, "quarterly": 3, "semi_annual": 6, "annual": 12}
COSTED = {"active", "cancelled", "expired"}
COMPARED = (
    "daily_cost",
    "period_start",
    "period_end",
    "period_days",
    "active_days",
    "list_charge",
    "period_charge",
    "billed_charge",
    "fiscal_year",
    "fiscal_quarter",
    "seats",
    "currency",
    "billing_cycle",
    "pricing_model",
    "provider",
    "plan_name",
    "category",
    "contract_id",
)
Key = tuple[str, date]


# --- the independent model ------------------------------------------------------------------------------


def q9(value: Decimal) -> Decimal:
    """Round half away from zero to 9 decimals (all model values are >= 0 where it matters)."""
    return value.quantize(NANO, rounding=ROUND_HALF_UP)


def on_anchor(year: int, month: int, anchor: int) -> date:
    """The anchor day of a month, or the month's last day when the month is shorter."""
    return date(year, month, min(anchor, calendar.monthrange(year, month)[1]))


def plus_months(year: int, month: int, months: int) -> tuple[int, int]:
    total = year * 12 + month - 1 + months
    return total // 12, total % 12 + 1


def billing_periods(plan: dict[str, Any], until: date) -> Iterable[tuple[date, date]]:
    """(start, end) of every billing period of the plan that starts on or before `until`."""
    start = date.fromisoformat(plan["start_date"])
    if plan["billing_cycle"] == "weekly":
        begin = start
        while begin <= until:
            yield begin, begin + timedelta(days=6)
            begin += timedelta(days=7)
        return
    step = MONTHS[plan["billing_cycle"]]
    anchor = plan.get("billing_anchor_day") or start.day
    year, month = start.year, start.month
    if on_anchor(year, month, anchor) > start:  # the anchor-aligned period containing start began earlier
        year, month = plus_months(year, month, -1)
    begin = on_anchor(year, month, anchor)
    while begin <= until:
        year, month = plus_months(year, month, step)
        following = on_anchor(year, month, anchor)
        yield begin, following - timedelta(days=1)
        begin = following


def charges(plan: dict[str, Any]) -> tuple[int, Decimal, Decimal]:
    """(charged seats, list charge, period charge after discount)."""
    seats = plan.get("seats")
    seats = seats if seats is not None and seats >= 1 else 1
    price = Decimal(plan["unit_price"])
    listed = price * seats if plan["pricing_model"] == "per_seat" else price
    value = Decimal(plan.get("discount_value") or "0")
    if plan.get("discount_type") == "percent":
        value = min(max(value, Decimal(0)), Decimal(100))
        charged = q9(listed * (Decimal(100) - value) / Decimal(100))
    elif plan.get("discount_type") == "fixed":
        charged = listed - max(value, Decimal(0))
    else:
        charged = listed
    return seats, listed, max(charged, Decimal(0))


def fiscal(day: date, first_month: int) -> tuple[int, int]:
    """(fiscal year named by the calendar year it ends in, quarter 1-4)."""
    year = day.year + 1 if first_month > 1 and day.month >= first_month else day.year
    return year, (day.month - first_month) % 12 // 3 + 1


def expected_rows(
    plans: list[dict[str, Any]], first: date, last: date, fiscal_start: int = 1
) -> dict[Key, dict[str, Any]]:
    """What the procedure must write for the window [first, last]."""
    rows: dict[Key, dict[str, Any]] = {}
    with localcontext() as ctx:
        ctx.prec = 60
        for plan in plans:
            if plan["status"] not in COSTED:
                continue
            seats, listed, charged = charges(plan)
            starts = date.fromisoformat(plan["start_date"])
            ends = date.fromisoformat(plan["end_date"]) if plan.get("end_date") else date.max
            for begin, end in billing_periods(plan, min(last, ends)):
                active = [
                    begin + timedelta(days=i)
                    for i in range((end - begin).days + 1)
                    if starts <= begin + timedelta(days=i) <= ends
                ]
                if not active:
                    continue
                days = (end - begin).days + 1
                billed = q9(charged * len(active) / days)
                daily = q9(charged / days)
                for day in active:
                    cost = billed - (len(active) - 1) * daily if day == active[-1] else daily
                    if cost == 0 or not first <= day <= last:
                        continue
                    year, quarter = fiscal(day, fiscal_start)
                    rows[(plan["subscription_id"], day)] = {
                        "daily_cost": cost,
                        "period_start": begin,
                        "period_end": end,
                        "period_days": days,
                        "active_days": len(active),
                        "list_charge": listed,
                        "period_charge": charged,
                        "billed_charge": billed,
                        "fiscal_year": year,
                        "fiscal_quarter": quarter,
                        "seats": seats,
                        "currency": plan["currency"],
                        "billing_cycle": plan["billing_cycle"],
                        "pricing_model": plan["pricing_model"],
                        "provider": plan["provider"],
                        "plan_name": plan["plan_name"],
                        "category": plan.get("category"),
                        "contract_id": plan.get("contract_id"),
                    }
    return rows


# --- test data ------------------------------------------------------------------------------------------


def plan(
    subscription_id: str,
    start_date: str,
    billing_cycle: str = "monthly",
    unit_price: str = "100.000000001",
    **extra: Any,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "subscription_id": subscription_id,
        "provider": "vendor_" + subscription_id.split("_")[0],
        "plan_name": subscription_id.upper(),
        "category": "tools",
        "status": "active",
        "start_date": start_date,
        "billing_cycle": billing_cycle,
        "pricing_model": "flat_fee",
        "unit_price": unit_price,
        "seats": None,
        "currency": "USD",
        "contract_id": f"c-{subscription_id}",
    }
    row.update(extra)
    return row


PLAN_SET = [
    # one per cycle, 9-decimal prices
    plan("weekly_seats", "2024-01-03", "weekly", "7.123456789", pricing_model="per_seat", seats=3),
    plan("monthly_flat", "2024-01-15", "monthly", "100.000000001", seats=4),
    plan(
        "quarterly_nullseats",
        "2024-02-10",
        "quarterly",
        "1000.000000007",
        pricing_model="per_seat",
        seats=None,
    ),
    plan(
        "semiannual_zeroseats",
        "2023-11-30",
        "semi_annual",
        "5000.123456789",
        pricing_model="per_seat",
        seats=0,
        currency="EUR",
    ),
    plan("annual_flat", "2024-03-01", "annual", "12000.000000001"),
    plan("annual_2023", "2023-07-17", "annual", "9999.999999999", pricing_model="per_seat", seats=2),
    # discounts
    plan(
        "pct_seats",
        "2024-01-05",
        "monthly",
        "19.99",
        pricing_model="per_seat",
        seats=5,
        discount_type="percent",
        discount_value="12.5",
    ),
    plan(
        "pct_nine",
        "2024-01-01",
        "monthly",
        "99.999999999",
        pricing_model="per_seat",
        seats=7,
        discount_type="percent",
        discount_value="33.333333333",
    ),
    plan(
        "pct_big",
        "2024-01-09",
        "quarterly",
        "1234567.123456789",
        pricing_model="per_seat",
        seats=1000,
        discount_type="percent",
        discount_value="7.654321987",
    ),
    plan("pct_over", "2024-01-01", "monthly", "50", discount_type="percent", discount_value="150"),
    plan(
        "pct_negative", "2024-01-01", "weekly", "70.000000007", discount_type="percent", discount_value="-5"
    ),
    plan("fixed_part", "2024-01-20", "monthly", "49.000000001", discount_type="fixed", discount_value="10.5"),
    plan("fixed_all", "2024-01-01", "monthly", "20", discount_type="fixed", discount_value="25"),
    plan("nulldisc", "2024-01-01", "monthly", "31.000000001", discount_type="percent", discount_value=None),
    # anchors through February, leap (2024) and non-leap (2025)
    plan("anchor31_leap", "2024-01-31", "monthly", "29.999999999"),
    plan("anchor31_2025", "2025-01-31", "monthly", "29.999999999"),
    plan("anchor30_leap", "2024-01-30", "monthly", "100.000000001"),
    plan("anchor29_2025", "2025-01-29", "monthly", "100.000000001"),
    plan("anchor29_leap", "2024-01-29", "monthly", "100.000000001"),
    plan("anchor31_quarterly", "2024-01-31", "quarterly", "300.000000001"),
    plan("leap_feb", "2024-02-01", "monthly", "29.000000001", pricing_model="per_seat", seats=2),
    # start mid-period through the anchor; explicit anchor equal to the start day; anchor 31 from Feb 29
    plan("midstart", "2024-03-20", "monthly", "31.000000003", billing_anchor_day=1),
    plan("midstart_q", "2024-05-05", "quarterly", "90.000000001", billing_anchor_day=15),
    plan("anchor_same", "2024-02-29", "monthly", "10.000000001", billing_anchor_day=29),
    plan("anchor31_from_feb", "2024-02-29", "monthly", "10.000000001", billing_anchor_day=31),
    # a start on the last day of a short month with a larger anchor starts the first period (not inside one)
    plan("anchor31_feb_quarterly", "2024-02-29", "quarterly", "10.000000001", billing_anchor_day=31),
    plan("anchor30_feb_annual", "2025-02-28", "annual", "365.000000001", billing_anchor_day=30),
    plan("anchor31_apr_semiannual", "2024-04-30", "semi_annual", "183.000000001", billing_anchor_day=31),
    # service ends mid-period
    plan(
        "cancelled_mid", "2024-01-10", "monthly", "100.000000001", status="cancelled", end_date="2024-05-20"
    ),
    plan("expired_week", "2024-01-01", "weekly", "7.000000001", status="expired", end_date="2024-03-13"),
    plan("active_ended", "2024-06-15", "annual", "3650.000000001", end_date="2024-09-30"),
    plan("pending", "2024-01-01", "monthly", "100", status="pending"),
    plan("ended_before_start", "2024-05-01", "monthly", "100", end_date="2024-04-01"),
    # rounding: a tie at the 10th decimal (30.000000015 / 30 = 1.0000000005) and a charge too small for a day
    plan("tie", "2024-04-01", "monthly", "30.000000015"),
    plan("tiny", "2024-04-01", "monthly", "0.00000001"),
    plan("future", "2026-01-01", "monthly", "100"),
]


# --- helpers --------------------------------------------------------------------------------------------


@dataclass
class CostOrg:
    slug: str
    dataset: str
    fiscal_start: int


async def new_org(service: app.Service, plans: list[dict[str, Any]], fiscal_start: int = 1) -> CostOrg:
    slug = f"saascost_{uuid.uuid4().hex[:8]}"
    dataset, _ = await service.orgs.create_org(slug, fiscal_year_start_month=fiscal_start)
    if plans:
        await service.warehouse.load_rows(dataset, PLANS, plans)
    return CostOrg(slug, dataset, fiscal_start)


async def run(service: app.Service, org: CostOrg, first: date, last: date, run_id: str = "") -> str:
    run_id = run_id or f"run_{uuid.uuid4().hex[:12]}"
    result = await service.warehouse.call_procedure(
        "organizations", PROCEDURE, [org.dataset, first, last, "test_pipeline", run_id]
    )
    assert result.rows[-1]["dataset"] == org.dataset
    return run_id


async def stored(service: app.Service, org: CostOrg) -> dict[Key, dict[str, Any]]:
    table = service.warehouse.table_ref(org.dataset, COSTS)
    rows = await service.warehouse.query(f"SELECT * FROM {table} ORDER BY subscription_id, cost_date")
    found = {(r["subscription_id"], r["cost_date"]): r for r in rows}
    assert len(found) == len(rows), "one row per subscription per day"
    return found


def compared(rows: dict[Key, dict[str, Any]]) -> dict[Key, tuple[Any, ...]]:
    return {key: tuple(row[c] for c in COMPARED) for key, row in rows.items()}


def assert_rows_equal(actual: dict[Key, dict[str, Any]], expected: dict[Key, dict[str, Any]]) -> None:
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    assert not missing, f"{len(missing)} rows missing, first {missing[:5]}"
    assert not extra, f"{len(extra)} unexpected rows, first {extra[:5]}"
    got, want = compared(actual), compared(expected)
    wrong = [
        (key, dict(zip(COMPARED, got[key], strict=True)), dict(zip(COMPARED, want[key], strict=True)))
        for key in sorted(want)
        if got[key] != want[key]
    ]
    assert not wrong, f"{len(wrong)} rows differ, first: {wrong[0]}"


def in_window(rows: dict[Key, dict[str, Any]], first: date, last: date) -> dict[Key, dict[str, Any]]:
    return {k: r for k, r in rows.items() if first <= k[1] <= last}


@pytest.fixture(scope="module", autouse=True)
async def deployed(service: app.Service) -> None:
    results = await service.procedures.sync(names=[PROCEDURE])
    assert [(r.name, r.outcome) for r in results] in (
        [(PROCEDURE, "created")],
        [(PROCEDURE, "updated")],
        [(PROCEDURE, "unchanged")],
    ), results


YEAR_2024 = (date(2024, 1, 1), date(2024, 12, 31))
YEAR_2025 = (date(2025, 1, 1), date(2025, 12, 31))


# --- tests ----------------------------------------------------------------------------------------------


async def test_full_years_match_the_model_row_by_row(service: app.Service) -> None:
    org = await new_org(service, PLAN_SET)
    run_2024 = await run(service, org, *YEAR_2024)
    run_2025 = await run(service, org, *YEAR_2025)
    actual = await stored(service, org)
    expected = {**expected_rows(PLAN_SET, *YEAR_2024), **expected_rows(PLAN_SET, *YEAR_2025)}
    assert_rows_equal(actual, expected)
    for (_, day), row in actual.items():
        assert row["x_pipeline_id"] == "test_pipeline"
        assert row["x_run_id"] == (run_2024 if day.year == 2024 else run_2025)
        assert row["x_ingested_at"] is not None
    # every cycle, both pricing models and the discount types are represented
    assert {r["billing_cycle"] for r in actual.values()} == {"weekly", *MONTHS}
    assert {r["pricing_model"] for r in actual.values()} == {"per_seat", "flat_fee"}
    ids = {k[0] for k in actual}
    for absent in ("pct_over", "fixed_all", "pending", "ended_before_start", "future"):
        assert absent not in ids


async def test_each_period_sums_exactly_to_its_billed_charge(service: app.Service) -> None:
    org = await new_org(service, PLAN_SET)
    first, last = date(2023, 7, 1), date(2024, 6, 30)
    await run(service, org, first, last)
    by_period: dict[tuple[str, date], list[dict[str, Any]]] = defaultdict(list)
    for (subscription, _), row in (await stored(service, org)).items():
        by_period[(subscription, row["period_start"])].append(row)
    complete = 0
    for (subscription, _), rows in by_period.items():
        head = rows[0]
        if head["period_start"] < first or head["period_end"] > last:
            continue  # the window cuts this period: only part of its days are here
        complete += 1
        assert sum(r["daily_cost"] for r in rows) == head["billed_charge"], (subscription, head)
        assert all(r["billed_charge"] == head["billed_charge"] for r in rows)
        if head["active_days"] == head["period_days"]:
            assert head["billed_charge"] == head["period_charge"], (subscription, head)
        else:
            assert head["billed_charge"] < head["period_charge"] or head["period_charge"] == 0
    assert complete > 100


async def test_known_values(service: app.Service) -> None:
    """Hand-checked rows, independent of the model."""
    org = await new_org(service, PLAN_SET)
    await run(service, org, *YEAR_2024)
    await run(service, org, date(2025, 1, 1), date(2025, 3, 31))
    rows = await stored(service, org)

    def row(subscription: str, day: str) -> dict[str, Any]:
        return rows[(subscription, date.fromisoformat(day))]

    # anchor 31 in a leap year: Jan 31 - Feb 28 (29 days), Feb 29 - Mar 30 (31 days), Mar 31 - Apr 29
    feb = row("anchor31_leap", "2024-02-28")
    assert (feb["period_start"], feb["period_end"]) == (date(2024, 1, 31), date(2024, 2, 28))
    assert row("anchor31_leap", "2024-02-29")["period_days"] == 31
    assert row("anchor31_leap", "2024-03-31")["period_end"] == date(2024, 4, 29)
    # ... and in 2025: Jan 31 - Feb 27 (28 days), Feb 28 - Mar 30
    assert row("anchor31_2025", "2025-02-27")["period_days"] == 28
    assert row("anchor31_2025", "2025-02-28")["period_start"] == date(2025, 2, 28)
    assert row("anchor29_2025", "2025-02-28")["period_end"] == date(2025, 3, 28)
    assert row("anchor29_leap", "2024-02-29")["period_end"] == date(2024, 3, 28)
    assert row("anchor30_leap", "2024-02-29")["period_start"] == date(2024, 2, 29)
    assert row("anchor30_leap", "2024-03-30")["period_start"] == date(2024, 3, 30)
    # leap February: 29.000000001 x 2 seats over 29 days
    feb = row("leap_feb", "2024-02-10")
    assert feb["period_days"] == 29 and feb["daily_cost"] == Decimal("2.000000000")
    assert row("leap_feb", "2024-02-29")["daily_cost"] == Decimal("2.000000002")
    # the tie rounds half away from zero: 30.000000015 / 30 = 1.0000000005 -> 1.000000001 (April, 30 days)
    assert row("tie", "2024-04-01")["daily_cost"] == Decimal("1.000000001")
    assert row("tie", "2024-04-30")["daily_cost"] == Decimal("30.000000015") - 29 * Decimal("1.000000001")
    # 10 nano-units over 30 days round to 0 a day: only the last day of each period has a row
    assert sorted(d for (s, d) in rows if s == "tiny" and d.month in (4, 5)) == [
        date(2024, 4, 30),
        date(2024, 5, 31),
    ]
    # start mid-period via the anchor: March 1-31 period, active March 20-31 (12 of 31 days)
    mid = row("midstart", "2024-03-20")
    assert (mid["period_start"], mid["period_days"], mid["active_days"]) == (date(2024, 3, 1), 31, 12)
    assert mid["billed_charge"] == Decimal("12.000000001")  # 31.000000003 x 12 / 31 = 12.0000000011...
    assert ("midstart", date(2024, 3, 19)) not in rows
    q = row("midstart_q", "2024-05-05")
    assert (q["period_start"], q["period_end"]) == (date(2024, 4, 15), date(2024, 7, 14))
    # month-end starts with a larger anchor: the first period starts on start_date itself
    q = row("anchor31_feb_quarterly", "2024-02-29")
    assert (q["period_start"], q["period_end"], q["active_days"]) == (
        date(2024, 2, 29),
        date(2024, 5, 30),
        92,
    )
    assert row("anchor31_feb_quarterly", "2024-05-31")["period_end"] == date(2024, 8, 30)
    a = row("anchor30_feb_annual", "2025-02-28")
    assert (a["period_start"], a["period_end"]) == (date(2025, 2, 28), date(2026, 2, 27))
    h = row("anchor31_apr_semiannual", "2024-10-31")
    assert (h["period_start"], h["period_end"]) == (date(2024, 10, 31), date(2025, 4, 29))
    # cancelled mid-period: last row on end_date carries the remainder
    assert max(d for (s, d) in rows if s == "cancelled_mid") == date(2024, 5, 20)
    last = row("cancelled_mid", "2024-05-20")
    assert (last["period_start"], last["active_days"], last["period_days"]) == (date(2024, 5, 10), 11, 31)
    # discounts: 12.5 % of 5 x 19.99, fixed 10.5; a negative percent counts as 0; NULL value: no discount
    assert row("pct_seats", "2024-02-05")["period_charge"] == Decimal("87.456250000")
    assert row("fixed_part", "2024-02-20")["period_charge"] == Decimal("38.500000001")
    assert row("pct_negative", "2024-01-01")["period_charge"] == Decimal("70.000000007")
    assert row("nulldisc", "2024-01-01")["period_charge"] == Decimal("31.000000001")
    # seats: NULL and 0 count as 1
    assert row("quarterly_nullseats", "2024-02-10")["seats"] == 1
    assert row("semiannual_zeroseats", "2024-02-10")["list_charge"] == Decimal("5000.123456789")


def random_plans(seed: int, count: int) -> list[dict[str, Any]]:
    """Plans with every attribute drawn at random, biased to month ends and large anchors."""
    rnd = random.Random(seed)
    plans = []
    for i in range(count):
        if rnd.random() < 0.3:  # the last day of a month
            year, month = rnd.randrange(2022, 2026), rnd.randrange(1, 13)
            start = date(year, month, calendar.monthrange(year, month)[1])
        else:
            start = date(2022, 1, 1) + timedelta(days=rnd.randrange(1460))
        extra: dict[str, Any] = {
            "status": rnd.choice(["active", "active", "cancelled", "expired", "pending"]),
            "pricing_model": rnd.choice(["per_seat", "flat_fee"]),
            "seats": rnd.choice([None, 0, -2, 1, 3, 250]),
        }
        if rnd.random() < 0.5:
            extra["billing_anchor_day"] = rnd.choice([1, 15, 28, 29, 30, 31, rnd.randrange(1, 32)])
        if rnd.random() < 0.4:
            extra["end_date"] = (start + timedelta(days=rnd.randrange(-10, 500))).isoformat()
        discount = rnd.choice([None, "percent", "fixed"])
        if discount:
            extra["discount_type"] = discount
            extra["discount_value"] = rnd.choice(
                [
                    None,
                    "0",
                    "100",
                    "150",
                    "-3",
                    str(Decimal(rnd.randrange(10**11)) * NANO),
                    str(Decimal(rnd.randrange(10**13)) * NANO),
                ]
            )
        price = str(Decimal(rnd.randrange(10 ** rnd.choice([6, 10, 14]))) * NANO)
        cycle = rnd.choice(["weekly", *MONTHS])
        plans.append(plan(f"r{i}_random", start.isoformat(), cycle, price, **extra))
    return plans


@pytest.mark.parametrize("seed", [11, 12])
async def test_random_plans_match_the_model(service: app.Service, seed: int) -> None:
    rnd = random.Random(seed)
    plans = random_plans(seed, 300)
    org = await new_org(service, plans, rnd.randrange(1, 13))
    first = date(2023, 1, 1) + timedelta(days=rnd.randrange(900))
    last = first + timedelta(days=rnd.randrange(366))
    await run(service, org, first, last)
    assert_rows_equal(await stored(service, org), expected_rows(plans, first, last, org.fiscal_start))


@pytest.mark.parametrize(
    ("fiscal_start", "checks"),
    [
        (
            1,
            {
                "2023-12-31": (2023, 4),
                "2024-01-01": (2024, 1),
                "2024-03-31": (2024, 1),
                "2024-04-01": (2024, 2),
                "2024-12-31": (2024, 4),
            },
        ),
        (
            4,
            {
                "2024-03-31": (2024, 4),
                "2024-04-01": (2025, 1),
                "2024-06-30": (2025, 1),
                "2024-07-01": (2025, 2),
                "2024-12-31": (2025, 3),
                "2025-01-01": (2025, 4),
                "2025-03-31": (2025, 4),
                "2025-04-01": (2026, 1),
            },
        ),
        (
            10,
            {
                "2024-09-30": (2024, 4),
                "2024-10-01": (2025, 1),
                "2024-12-31": (2025, 1),
                "2025-01-01": (2025, 2),
                "2025-03-31": (2025, 2),
                "2025-04-01": (2025, 3),
                "2025-07-01": (2025, 4),
                "2025-09-30": (2025, 4),
                "2025-10-01": (2026, 1),
            },
        ),
    ],
)
async def test_fiscal_year_and_quarter(
    service: app.Service, fiscal_start: int, checks: dict[str, tuple[int, int]]
) -> None:
    plans = [plan("fy_monthly", "2023-06-15", "monthly", "100.000000001", billing_anchor_day=1)]
    org = await new_org(service, plans, fiscal_start)
    first, last = date(2023, 12, 1), date(2024, 11, 30)
    second = (date(2024, 12, 1), date(2025, 11, 30))
    await run(service, org, first, last)
    await run(service, org, *second)
    rows = await stored(service, org)
    for day, (year, quarter) in checks.items():
        got = rows[("fy_monthly", date.fromisoformat(day))]
        assert (got["fiscal_year"], got["fiscal_quarter"]) == (year, quarter), (fiscal_start, day)
    expected = {
        **expected_rows(plans, first, last, fiscal_start),
        **expected_rows(plans, *second, fiscal_start),
    }
    assert_rows_equal(rows, expected)


async def test_a_window_writes_the_same_rows_as_a_bigger_run_and_nothing_else(service: app.Service) -> None:
    whole = await new_org(service, PLAN_SET)
    await run(service, whole, *YEAR_2024)
    full = await stored(service, whole)
    cut = (date(2024, 2, 10), date(2024, 5, 20))  # cuts monthly, quarterly and weekly periods

    part = await new_org(service, PLAN_SET)
    await run(service, part, *cut)
    windowed = await stored(service, part)
    assert {d for (_, d) in windowed} <= {cut[0] + timedelta(days=i) for i in range(101)}
    assert compared(windowed) == compared(in_window(full, *cut))

    # re-running the cut window on the full run's org replaces exactly those rows
    rerun = await run(service, whole, *cut)
    after = await stored(service, whole)
    assert compared(after) == compared(full)
    for key, row in after.items():
        if cut[0] <= key[1] <= cut[1]:
            assert row["x_run_id"] == rerun
        else:
            assert row == full[key]


async def test_rerun_is_idempotent_and_renews_lineage(service: app.Service) -> None:
    org = await new_org(service, PLAN_SET)
    first_run = await run(service, org, *YEAR_2024)
    before = await stored(service, org)
    second_run = await run(service, org, *YEAR_2024)
    after = await stored(service, org)
    assert len(after) == len(before)
    assert compared(after) == compared(before)
    assert sum(r["daily_cost"] for r in after.values()) == sum(r["daily_cost"] for r in before.values())
    assert {r["x_run_id"] for r in before.values()} == {first_run}
    assert {r["x_run_id"] for r in after.values()} == {second_run}
    assert all(after[k]["x_ingested_at"] >= before[k]["x_ingested_at"] for k in after)


async def test_plans_changed_between_runs_replace_the_window_rows(service: app.Service) -> None:
    plans = [plan("changing", "2024-01-01", "monthly", "31"), plan("dropped", "2024-01-01", "weekly", "7")]
    org = await new_org(service, plans)
    await run(service, org, *YEAR_2024)
    changed = [plan("changing", "2024-01-01", "monthly", "62", status="cancelled", end_date="2024-06-10")]
    await service.warehouse.load_rows(org.dataset, PLANS, changed, replace=True)
    window = (date(2024, 6, 1), date(2024, 12, 31))
    await run(service, org, *window)
    rows = await stored(service, org)
    expected = {
        **expected_rows(plans, date(2024, 1, 1), date(2024, 5, 31)),
        **expected_rows(changed, *window),
    }
    assert_rows_equal(rows, expected)


async def test_orgs_do_not_touch_each_other(service: app.Service) -> None:
    org_a = await new_org(service, PLAN_SET[:6])
    org_b = await new_org(service, PLAN_SET[6:12])
    run_b = await run(service, org_b, *YEAR_2024)
    rows_b = await stored(service, org_b)
    await run(service, org_a, *YEAR_2024)
    await run(service, org_a, date(2024, 3, 1), date(2024, 3, 31))
    assert await stored(service, org_b) == rows_b
    assert {r["x_run_id"] for r in rows_b.values()} == {run_b}
    assert_rows_equal(await stored(service, org_a), expected_rows(PLAN_SET[:6], *YEAR_2024))
    assert_rows_equal(rows_b, expected_rows(PLAN_SET[6:12], *YEAR_2024))


async def test_argument_checks_and_window_limits(service: app.Service) -> None:
    plans = [plan("limits", "2023-01-01", "monthly", "100.000000001")]
    org = await new_org(service, plans)
    await run(service, org, date(2024, 1, 1), date(2024, 12, 31))  # 366 days: the limit is allowed
    before = await stored(service, org)
    assert len(before) == 366
    for first, last, message in (
        (date(2024, 1, 1), date(2025, 1, 1), "367 days exceeds"),
        (date(2023, 1, 1), date(2024, 12, 31), "731 days exceeds"),
        (date(2024, 2, 1), date(2024, 1, 31), "must not be after"),
    ):
        with warehouse_rejects(message):
            await run(service, org, first, last)
    call, jan = service.warehouse.call_procedure, (date(2024, 1, 1), date(2024, 1, 2))
    with warehouse_rejects("p_dataset must be a dataset name"):
        await call("organizations", PROCEDURE, [org.dataset + "-x", *jan, "p", "r"])
    with warehouse_rejects("p_pipeline_id and p_run_id are required"):
        await call("organizations", PROCEDURE, [org.dataset, *jan, "p", None])
    assert await stored(service, org) == before  # a refused call writes nothing
    await run(service, org, date(2024, 2, 29), date(2024, 2, 29))  # a one-day window
    assert compared(await stored(service, org)) == compared(before)
