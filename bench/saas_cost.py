"""The `saas_cost` pipeline on the emulator for 10,000 generated plans over a year, against its floor.

1. Emulator: 10,000 deterministic plans (`random.Random(42)`) are imported into a fresh org, the stored
   procedures are synced, and `saas_subscription/costs/saas_cost` is run over the 365 days ending
   `WINDOW_END` (RunPipeline over gRPC, then the run awaited); reported: the run's wall time, each step's
   duration, the daily rows (`saas_subscription_plan_costs_daily` in the window) and FOCUS rows written,
   rows/s.
2. Floor: the same daily expansion as ONE `CREATE TABLE AS SELECT` in DuckDB in-process, with the rules of
   `sp_calculate_saas_subscription_costs_daily` (cycles, anchor clamping, discounts, proration, remainder on
   the last active day; money in integer nano-units, stored as DECIMAL(38, 9)), on the same plans.
3. Both row counts and SUM(daily_cost) are compared exactly, and rows and sums per subscription; a
   difference is printed with the subscriptions that differ, never hidden.

`python -m bench saas` runs only this part (its own emulator and service).
"""

from __future__ import annotations

import asyncio
import csv
import random
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
from grpc import aio

from bench.stack import UNLIMITED, drain, new_stack, start_stack
from cloudact.pipeline.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from server.saas import SaasPlan, import_plans

PLANS = 10_000
SEED = 42
WINDOW_END = date(2025, 12, 31)
WINDOW_START = WINDOW_END - timedelta(days=364)
PROVIDER, DOMAIN, PIPELINE = "saas_subscription", "costs", "saas_cost"
PROCEDURES = ("sp_calculate_saas_subscription_costs_daily", "sp_convert_saas_costs_to_focus")
DAILY = "saas_subscription_plan_costs_daily"
FOCUS = "cost_data_focus_1_2"
SAAS_SECONDS = 180.0  # the whole part, alone or after the other parts
RUN_SECONDS = 150.0  # wait for the run at most this long; a run still going then is cancelled
QUERY_SECONDS = 30.0  # each read-back query
FLOOR_RESERVE = 30.0  # kept for the DuckDB floor and the comparison
DIFF_SAMPLES = 5  # subscriptions shown when the totals differ

CYCLES = ("monthly", "annual", "quarterly", "semi_annual", "weekly")
CYCLE_WEIGHTS = (50, 20, 12, 8, 10)
CYCLE_MONTHS: dict[str, Decimal] = {
    "weekly": Decimal("0.25"),
    "monthly": Decimal(1),
    "quarterly": Decimal(3),
    "semi_annual": Decimal(6),
    "annual": Decimal(12),
}
STATUSES = ("active", "cancelled", "expired", "pending")
STATUS_WEIGHTS = (72, 10, 6, 12)
VENDORS = (
    ("slack", "Business+", "Business Applications"),
    ("github", "Enterprise", "Developer Tools"),
    ("atlassian", "Jira Premium", "Developer Tools"),
    ("figma", "Organization", "Developer Tools"),
    ("notion", "Team", "Business Applications"),
    ("zoom", "Pro", "Business Applications"),
    ("datadog", "Pro", "Management and Governance"),
    ("openai", "ChatGPT Team", "AI and Machine Learning"),
    ("salesforce", "Enterprise", "Business Applications"),
    ("okta", "Workforce Identity", "Security"),
    ("1password", "Business", "Security"),
    ("dropbox", "Advanced", "Storage"),
    ("adobe", "Creative Cloud", "Media"),
    ("linear", "Standard", "Developer Tools"),
    ("miro", "Business", "Business Applications"),
    ("hubspot", "Sales Hub", None),
)
PERCENTS = ("5", "10", "12.5", "15", "20", "25", "33.333333333", "50", "100")
TEAMS = ("platform", "research", "sales", "finance", "design")


# --- the plans ----------------------------------------------------------------------------------------------


def _day(rng: random.Random, first: date, last: date) -> date:
    return first + timedelta(days=rng.randint(0, (last - first).days))


def _price(rng: random.Random, monthly_low: int, monthly_high: int, cycle: str) -> Decimal:
    """A monthly price in cents scaled to the cycle; 15 % of them with 9 decimals."""
    monthly = Decimal(rng.randint(monthly_low * 100, monthly_high * 100)) / 100
    if rng.random() < 0.15:
        monthly += Decimal(rng.randint(0, 10**7 - 1)) / 10**9
    return (monthly * CYCLE_MONTHS[cycle]).quantize(Decimal("0.000000001"))


def generate_plans(count: int = PLANS, seed: int = SEED) -> list[SaasPlan]:
    """`count` deterministic plans: every cycle and status, both pricing models, both discount kinds and
    none, anchor days including 29-31, open-ended and ending plans, starts before, in and after the window."""
    rng = random.Random(seed)
    plans: list[SaasPlan] = []
    for i in range(count):
        provider, name, category = VENDORS[rng.randrange(len(VENDORS))]
        cycle = rng.choices(CYCLES, CYCLE_WEIGHTS)[0]
        status = rng.choices(STATUSES, STATUS_WEIGHTS)[0]
        per_seat = rng.random() < 0.6
        price = _price(rng, 4, 120, cycle) if per_seat else _price(rng, 50, 20_000, cycle)
        seats: int | None
        if per_seat:
            roll = rng.random()
            seats = None if roll < 0.03 else 0 if roll < 0.05 else rng.randint(1, 500)
        else:
            seats = rng.randint(1, 50) if rng.random() < 0.2 else None
        record: dict[str, Any] = {
            "subscription_id": f"bench-{i:05d}",
            "provider": provider,
            "plan_name": name,
            "category": category,
            "status": status,
            "billing_cycle": cycle,
            "pricing_model": "per_seat" if per_seat else "flat_fee",
            "unit_price": price,
            "seats": seats,
            "currency": rng.choices(("USD", "EUR", "GBP"), (80, 12, 8))[0],
        }
        roll = rng.random()
        if roll < 0.30:
            record["discount_type"] = "percent"
            record["discount_value"] = (
                PERCENTS[rng.randrange(len(PERCENTS))]
                if rng.random() < 0.7
                else str(Decimal(rng.randint(0, 10_000)) / 100)
            )
        elif roll < 0.45:
            list_charge = price * (max(seats or 1, 1) if per_seat else 1)
            # up to 120 % of the list charge: some fixed discounts exceed it and floor the charge at 0
            record["discount_type"] = "fixed"
            record["discount_value"] = (list_charge * Decimal(rng.randint(1, 120)) / 100).quantize(
                Decimal("0.01")
            )
        roll = rng.random()
        if roll < 0.20:
            record["billing_anchor_day"] = rng.choice((29, 30, 31))
        elif roll < 0.45:
            record["billing_anchor_day"] = rng.randint(1, 28)
        if status == "pending":
            start = _day(rng, date(2025, 6, 1), date(2026, 6, 30))
            end = None
        elif status == "expired":
            start = _day(rng, date(2022, 1, 1), date(2025, 3, 31))
            end = min(start + timedelta(days=rng.randint(30, 900)), date(2025, 11, 30))
        elif status == "cancelled":
            start = _day(rng, date(2022, 1, 1), date(2025, 11, 30))
            end = start + timedelta(days=rng.randint(1, 700))
        else:
            # a few start after the window (no rows), most before or in it; 12 % have a contract end
            start = _day(rng, date(2022, 1, 1), date(2026, 2, 28))
            end = start + timedelta(days=rng.randint(90, 1500)) if rng.random() < 0.12 else None
        record["start_date"] = start
        record["end_date"] = end
        if rng.random() < 0.5:
            record["contract_id"] = f"C-{i:05d}"
        if rng.random() < 0.3:
            record["tags"] = {"team": rng.choice(TEAMS)}
        plans.append(SaasPlan.model_validate(record))
    return plans


def mix(plans: Sequence[SaasPlan]) -> str:
    """One line describing the generated mix."""

    def count(what: str, values: Sequence[object]) -> str:
        return f"{what} " + "/".join(f"{v} {sum(1 for x in values if x == v)}" for v in dict.fromkeys(values))

    anchors = [p.billing_anchor_day for p in plans]
    return "; ".join(
        (
            count("cycle", [p.billing_cycle for p in plans]),
            count("status", [p.status for p in plans]),
            count("pricing", [p.pricing_model for p in plans]),
            count("discount", [p.discount_type or "none" for p in plans]),
            f"anchor none {anchors.count(None)}/1-28 {sum(1 for a in anchors if a and a <= 28)}"
            f"/29-31 {sum(1 for a in anchors if a and a >= 29)}",
            f"with end_date {sum(1 for p in plans if p.end_date)}",
            f"start after the window {sum(1 for p in plans if p.start_date > WINDOW_END)}",
        )
    )


# --- 1. the pipeline on the emulator ------------------------------------------------------------------------


@dataclass
class EmulatorResult:
    """The real run: timings in seconds, rows from the tables."""

    org_slug: str = ""
    dataset: str = ""
    import_s: float = 0.0
    sync_s: float = 0.0
    sync_outcomes: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    state: str = ""
    error: str = ""
    wall_s: float = 0.0  # RunPipeline call until the run ended (client side)
    server_s: float = 0.0  # run start_time -> end_time
    steps: list[tuple[str, str, float, int]] = field(default_factory=list)  # id, state, seconds, rows
    daily_rows: int = 0
    daily_total: Decimal | None = None
    focus_rows: int = 0

    def step_seconds(self, step_id: str) -> float | None:
        return next((s for i, _, s, _ in self.steps if i == step_id), None)


async def _query(
    service: app.Service, sql: str, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    rows = await asyncio.wait_for(service.warehouse.query(sql, params), QUERY_SECONDS)
    return [dict(r) for r in rows]


async def run_emulator(
    service: app.Service, plans: list[SaasPlan], out: EmulatorResult, run_seconds: float = RUN_SECONDS
) -> None:
    """Fresh org, import, sync, one run; fills `out` as it goes (so a timeout still shows what was done)."""
    wh = service.warehouse
    out.org_slug = f"bench_saas_{uuid.uuid4().hex[:8]}"
    out.dataset, key = await service.orgs.create_org(out.org_slug, company_name="Bench SaaS", plan=UNLIMITED)
    began = time.perf_counter()
    imported = await import_plans(wh, out.dataset, plans)
    out.import_s = time.perf_counter() - began
    if imported != len(plans):
        raise RuntimeError(f"import_plans loaded {imported} of {len(plans)} plans")
    began = time.perf_counter()
    results = await service.procedures.sync(names=list(PROCEDURES))
    out.sync_s = time.perf_counter() - began
    out.sync_outcomes = {r.name: r.outcome + (f" ({r.error})" if r.error else "") for r in results}
    if any(r.outcome == "failed" for r in results):
        raise RuntimeError(f"procedure sync failed: {out.sync_outcomes}")
    await drain(service, 10.0)
    request = pipeline_service_pb2.RunPipelineRequest(
        org_slug=out.org_slug,
        provider=PROVIDER,
        domain=DOMAIN,
        pipeline=PIPELINE,
        start_date=WINDOW_START.isoformat(),
        end_date=WINDOW_END.isoformat(),
    )
    # RunPipeline over gRPC returns once the run is accepted; the run is then awaited in-process (the
    # same as `wait=true` without its 10-minute cap), so the wait is bounded here and the run can be
    # cancelled when it is cut.
    async with aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        began = time.perf_counter()
        response = await stub.RunPipeline(request, metadata=(("x-api-key", key.api_key),), timeout=30)
        out.run_id = response.run.run_id
        run = await service.runs.get(out.org_slug, out.run_id)
        await service.runs.wait(run, run_seconds)
        out.wall_s = time.perf_counter() - began
    out.state, out.error = run.state, run.error
    if not run.terminal:
        await service.runs.cancel(out.org_slug, run.run_id)
        await service.runs.wait(run, 10.0)
        out.error = f"still {out.state} after {run_seconds:.0f} s; cancelled ({run.state})"
        out.state = f"{out.state}, cut"
        return
    if run.start_time and run.end_time:
        out.server_s = (run.end_time - run.start_time).total_seconds()
    out.steps = [(v.step_id, v.state, v.duration_ms / 1000, v.rows_written) for v in run.steps.values()]
    daily = await _query(
        service,
        f"SELECT COUNT(*) AS n, SUM(daily_cost) AS total FROM {wh.table_ref(out.dataset, DAILY)} "
        "WHERE cost_date BETWEEN @a AND @b",
        {"a": WINDOW_START, "b": WINDOW_END},
    )
    out.daily_rows = int(daily[0]["n"])
    total = daily[0]["total"]
    out.daily_total = None if total is None else Decimal(str(total))
    focus = await _query(
        service,
        f"SELECT COUNT(*) AS n FROM {wh.table_ref(out.dataset, FOCUS)} WHERE x_RunId = @run",
        {"run": out.run_id},
    )
    out.focus_rows = int(focus[0]["n"])


async def emulator_totals(service: app.Service, dataset: str) -> dict[str, tuple[int, Decimal]]:
    """Rows and SUM(daily_cost) per subscription, to explain a difference."""
    rows = await _query(
        service,
        "SELECT subscription_id, COUNT(*) AS n, SUM(daily_cost) AS total "
        f"FROM {service.warehouse.table_ref(dataset, DAILY)} WHERE cost_date BETWEEN @a AND @b "
        "GROUP BY subscription_id",
        {"a": WINDOW_START, "b": WINDOW_END},
    )
    return {r["subscription_id"]: (int(r["n"]), Decimal(str(r["total"]))) for r in rows}


# --- 2. the floor: one query in DuckDB ----------------------------------------------------------------------

COLUMNS = (
    ("subscription_id", "VARCHAR"),
    ("provider", "VARCHAR"),
    ("plan_name", "VARCHAR"),
    ("category", "VARCHAR"),
    ("status", "VARCHAR"),
    ("start_date", "DATE"),
    ("end_date", "DATE"),
    ("billing_cycle", "VARCHAR"),
    ("pricing_model", "VARCHAR"),
    ("unit_price", "DECIMAL(38, 9)"),
    ("seats", "BIGINT"),
    ("currency", "VARCHAR"),
    ("discount_type", "VARCHAR"),
    ("discount_value", "DECIMAL(38, 9)"),
    ("billing_anchor_day", "BIGINT"),
    ("contract_id", "VARCHAR"),
)
PLANS_DDL = "CREATE TABLE saas_subscription_plans (" + ", ".join(f"{c} {k}" for c, k in COLUMNS) + ")"
# The tuples go through a CSV file: 10,000 plans load in a fraction of a second (executemany takes ~13 s,
# list parameters ~7 s). Empty fields are NULL (no plan has an empty string); money stays exact text.
PLANS_LOAD = (
    "INSERT INTO saas_subscription_plans SELECT * FROM read_csv(?, header = false, nullstr = '', columns = {"
    + ", ".join(f"'{c}': '{k}'" for c, k in COLUMNS)
    + "})"
)

# The daily expansion of sp_calculate_saas_subscription_costs_daily as one statement. Money is computed in
# HUGEINT nano-units (value x 10^9) with integer division and explicit half-up rounding (all amounts are
# >= 0 here, so half-up is half away from zero), and stored as DECIMAL(38, 9): DuckDB's DECIMAL division
# returns DOUBLE, so no DECIMAL division is used. $1/$2 = window, $3 = fiscal year start month.
DAILY_SQL = """
CREATE TABLE saas_subscription_plan_costs_daily AS
WITH params AS (
  SELECT CAST($1 AS DATE) AS w_start, CAST($2 AS DATE) AS w_end, CAST($3 AS BIGINT) AS fy_start,
         'saas_subscription_cost' AS pipeline_id, 'duckdb-floor' AS run_id
),
plans AS (
  SELECT p.subscription_id, p.provider, p.plan_name, p.category, p.currency, p.billing_cycle,
    p.pricing_model, p.contract_id, p.start_date, p.end_date, p.discount_type,
    greatest(coalesce(p.seats, 1), 1) AS seats,
    CASE p.billing_cycle WHEN 'weekly' THEN 0 WHEN 'monthly' THEN 1 WHEN 'quarterly' THEN 3
                         WHEN 'semi_annual' THEN 6 WHEN 'annual' THEN 12 END AS cycle_months,
    least(greatest(coalesce(p.billing_anchor_day, day(p.start_date)), 1), 31) AS anchor_day,
    CAST(p.unit_price * 1000000000 AS HUGEINT)
      * CASE WHEN p.pricing_model = 'per_seat' THEN greatest(coalesce(p.seats, 1), 1) ELSE 1 END AS list_n,
    CAST(least(greatest(coalesce(p.discount_value, 0), 0),
               CASE WHEN p.discount_type = 'percent' THEN 100 ELSE 9000000000 END)
         * 1000000000 AS HUGEINT) AS discount_n,
    greatest(p.start_date, w_start) AS lo,
    least(coalesce(p.end_date, w_end), w_end) AS hi
  FROM saas_subscription_plans AS p, params
  WHERE p.status IN ('active', 'cancelled', 'expired')
    AND p.billing_cycle IN ('weekly', 'monthly', 'quarterly', 'semi_annual', 'annual')
    AND p.pricing_model IN ('per_seat', 'flat_fee')
    AND p.start_date <= w_end
    AND (p.end_date IS NULL OR p.end_date >= greatest(p.start_date, w_start))
),
charged AS (
  SELECT *,
    CASE WHEN discount_type = 'percent'
           THEN (2 * greatest(list_n, 0) * (100000000000 - discount_n) + 100000000000) // 200000000000
         WHEN discount_type = 'fixed' THEN greatest(greatest(list_n, 0) - discount_n, 0)
         ELSE greatest(list_n, 0) END AS charge_n,
    year(start_date) * 12 + month(start_date) - 1
      - CASE WHEN least(anchor_day, day(last_day(start_date))) > day(start_date) THEN 1 ELSE 0 END AS i0,
    year(lo) * 12 + month(lo) - 1 AS lo_idx,
    year(hi) * 12 + month(hi) - 1 AS hi_idx
  FROM plans
),
numbered AS (
  SELECT *, i0 + k * cycle_months AS s_idx, i0 + (k + 1) * cycle_months AS e_idx
  FROM (
    SELECT *, unnest(generate_series(
      CASE WHEN cycle_months = 0 THEN date_diff('day', start_date, lo) // 7
           ELSE greatest((lo_idx - i0) // cycle_months - 1, 0) END,
      CASE WHEN cycle_months = 0 THEN date_diff('day', start_date, hi) // 7
           ELSE (hi_idx - i0) // cycle_months END)) AS k
    FROM charged
  )
),
periods AS (
  SELECT * FROM (
    SELECT *,
      CASE WHEN cycle_months = 0 THEN start_date + CAST(7 * k AS INTEGER)
           ELSE make_date(s_idx // 12, s_idx % 12 + 1,
                          least(anchor_day, day(last_day(make_date(s_idx // 12, s_idx % 12 + 1, 1))))) END
        AS period_start,
      CASE WHEN cycle_months = 0 THEN start_date + CAST(7 * k + 6 AS INTEGER)
           ELSE make_date(e_idx // 12, e_idx % 12 + 1,
                          least(anchor_day, day(last_day(make_date(e_idx // 12, e_idx % 12 + 1, 1))))) - 1 END
        AS period_end
    FROM numbered
  )
  WHERE period_start <= hi AND period_end >= lo
),
billed AS (
  SELECT *,
    q + CASE WHEN 2 * r >= period_days THEN 1 ELSE 0 END AS base_n,
    q * active_days + (r * active_days) // period_days
      + CASE WHEN 2 * ((r * active_days) % period_days) >= period_days THEN 1 ELSE 0 END AS billed_n
  FROM (
    SELECT *, charge_n // period_days AS q, charge_n % period_days AS r,
      date_diff('day', active_start, active_end) + 1 AS active_days
    FROM (
      SELECT *, date_diff('day', period_start, period_end) + 1 AS period_days,
        greatest(start_date, period_start) AS active_start,
        least(coalesce(end_date, period_end), period_end) AS active_end
      FROM periods
    )
  )
),
days AS (
  SELECT *, first_day + CAST(offset_days AS INTEGER) AS cost_date
  FROM (
    SELECT b.*, greatest(b.active_start, w_start) AS first_day,
      unnest(range(0, date_diff('day', greatest(b.active_start, w_start), least(b.active_end, w_end)) + 1))
        AS offset_days
    FROM billed AS b, params
  )
),
costed AS (
  SELECT *,
    CASE WHEN cost_date = active_end THEN billed_n - (active_days - 1) * base_n ELSE base_n END AS daily_n
  FROM days
)
SELECT
  d.subscription_id, d.provider, d.plan_name, d.category, d.cost_date,
  CAST(d.daily_n AS DECIMAL(38, 0)) * 0.000000001::DECIMAL(38, 9) AS daily_cost,
  d.currency, d.billing_cycle, d.pricing_model, d.seats, d.period_start, d.period_end,
  d.period_days, d.active_days,
  CAST(d.list_n AS DECIMAL(38, 0)) * 0.000000001::DECIMAL(38, 9) AS list_charge,
  CAST(d.charge_n AS DECIMAL(38, 0)) * 0.000000001::DECIMAL(38, 9) AS period_charge,
  CAST(d.billed_n AS DECIMAL(38, 0)) * 0.000000001::DECIMAL(38, 9) AS billed_charge,
  year(d.cost_date) + CASE WHEN fy_start > 1 AND month(d.cost_date) >= fy_start THEN 1 ELSE 0 END
    AS fiscal_year,
  ((month(d.cost_date) - fy_start + 12) % 12) // 3 + 1 AS fiscal_quarter,
  d.contract_id, pipeline_id AS x_pipeline_id, run_id AS x_run_id, current_timestamp AS x_ingested_at
FROM costed AS d, params
WHERE d.daily_n != 0
"""


@dataclass
class DuckResult:
    """The floor: load and query seconds, rows and their total."""

    version: str = duckdb.__version__
    threads: int = 0
    load_s: float = 0.0
    query_s: float = 0.0
    rows: int = 0
    total: Decimal | None = None
    per_subscription: dict[str, tuple[int, Decimal]] = field(default_factory=dict)


def _plan_tuple(p: SaasPlan) -> tuple[object, ...]:
    return (
        p.subscription_id,
        p.provider,
        p.plan_name,
        p.category,
        p.status,
        p.start_date,
        p.end_date,
        p.billing_cycle,
        p.pricing_model,
        str(p.unit_price),
        p.seats,
        p.currency,
        p.discount_type,
        None if p.discount_value is None else str(p.discount_value),
        p.billing_anchor_day,
        p.contract_id,
    )


def run_duckdb(plans: list[SaasPlan], fiscal_year_start_month: int = 1) -> DuckResult:
    """Load the plans into an in-memory DuckDB and time the one CREATE TABLE AS SELECT."""
    out = DuckResult()
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET enable_progress_bar = false")
        threads = con.execute("SELECT current_setting('threads')").fetchone()
        out.threads = int(threads[0]) if threads else 0
        began = time.perf_counter()
        con.execute(PLANS_DDL)
        with tempfile.TemporaryDirectory(prefix="bench-saas-") as folder:
            path = Path(folder) / "plans.csv"
            with path.open("w", newline="") as file:
                csv.writer(file).writerows(_plan_tuple(p) for p in plans)
            con.execute(PLANS_LOAD, [str(path)])
        out.load_s = time.perf_counter() - began
        began = time.perf_counter()
        con.execute(DAILY_SQL, [WINDOW_START, WINDOW_END, fiscal_year_start_month])
        out.query_s = time.perf_counter() - began
        row = con.execute(
            "SELECT COUNT(*), SUM(daily_cost) FROM saas_subscription_plan_costs_daily"
        ).fetchone()
        assert row is not None
        out.rows, out.total = int(row[0]), (None if row[1] is None else Decimal(row[1]))
        out.per_subscription = {
            sid: (int(n), Decimal(total))
            for sid, n, total in con.execute(
                "SELECT subscription_id, COUNT(*), SUM(daily_cost) FROM saas_subscription_plan_costs_daily "
                "GROUP BY subscription_id"
            ).fetchall()
        }
    finally:
        con.close()
    return out


# --- the whole part and its report --------------------------------------------------------------------------


@dataclass
class SaasResult:
    """Everything the SaaS part measured (parts left empty when they did not run)."""

    plans: int = 0
    mix: str = ""
    generate_s: float = 0.0
    emulator: EmulatorResult = field(default_factory=EmulatorResult)
    duck: DuckResult | None = None
    emulator_error: str = ""
    duck_error: str = ""
    differences: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ratio(self) -> float | None:
        """Emulator run wall time over DuckDB query time."""
        if self.duck is None or not self.duck.query_s or not self.emulator.wall_s:
            return None
        return self.emulator.wall_s / self.duck.query_s

    @property
    def counts_match(self) -> bool | None:
        if self.duck is None or self.emulator.state != "COMPLETED":
            return None
        return self.duck.rows == self.emulator.daily_rows

    @property
    def totals_match(self) -> bool | None:
        if self.duck is None or self.emulator.state != "COMPLETED":
            return None
        return self.duck.total == self.emulator.daily_total


def _explain(
    result: SaasResult, emulated: dict[str, tuple[int, Decimal]], plans: list[SaasPlan]
) -> list[str]:
    assert result.duck is not None
    ours = result.duck.per_subscription
    by_id = {p.subscription_id: p for p in plans}
    differ = sorted(sid for sid in set(ours) | set(emulated) if ours.get(sid) != emulated.get(sid))
    if not differ:
        return [f"per subscription: rows and SUM(daily_cost) equal for all {len(ours):,} with costs"]
    lines = [f"per subscription: {len(differ)} of {len(set(ours) | set(emulated)):,} differ (rows, sum), "]
    lines[0] += "emulator vs DuckDB:"
    for sid in differ[:DIFF_SAMPLES]:
        p = by_id.get(sid)
        what = (
            f"{p.billing_cycle} {p.pricing_model} price {p.unit_price} seats {p.seats} "
            f"{p.discount_type or 'no'} discount {p.discount_value or ''} anchor {p.billing_anchor_day} "
            f"{p.start_date}..{p.end_date or ''} {p.status}"
            if p
            else "?"
        )
        lines.append(f"  {sid}: {emulated.get(sid)} vs {ours.get(sid)} [{what}]")
    return lines


async def measure(service: app.Service, result: SaasResult, seconds: float = SAAS_SECONDS) -> SaasResult:
    """Generate, run on the emulator, run the floor, compare, within about `seconds`; fills `result` as it
    goes, so what was measured survives a cancellation by the caller's own (looser) bound."""
    began = time.perf_counter()
    deadline = began + seconds

    def left(reserve: float = 0.0) -> float:
        return max(deadline - time.perf_counter() - reserve, 1.0)

    plans = generate_plans()
    result.generate_s = time.perf_counter() - began
    result.plans = len(plans)
    result.mix = mix(plans)
    try:
        # DuckDB and the read-backs need well under FLOOR_RESERVE seconds
        run_seconds = min(RUN_SECONDS, left(FLOOR_RESERVE + 20))
        await asyncio.wait_for(
            run_emulator(service, plans, result.emulator, run_seconds), left(FLOOR_RESERVE)
        )
    except Exception as exc:  # report it; the floor still runs
        result.emulator_error = f"{type(exc).__name__}: {exc}"
    try:
        result.duck = await asyncio.to_thread(run_duckdb, plans)
    except Exception as exc:
        result.duck_error = f"{type(exc).__name__}: {exc}"
    if result.counts_match is not None:  # both ran: compare per subscription too (and explain a difference)
        try:
            emulated = await asyncio.wait_for(emulator_totals(service, result.emulator.dataset), left())
            result.differences = _explain(result, emulated, plans)
        except Exception as exc:
            result.differences = [f"per-subscription comparison failed: {type(exc).__name__}: {exc}"]
    result.elapsed_s = time.perf_counter() - began
    return result


def _rate(rows: int, seconds: float | None) -> str:
    return f"{rows / seconds:,.0f}" if seconds else "-"


def _secs(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def table(result: SaasResult) -> list[str]:
    """The printed table and checks."""
    e, d = result.emulator, result.duck
    window = f"{WINDOW_START}..{WINDOW_END} ({(WINDOW_END - WINDOW_START).days + 1} days)"
    lines = [
        f"SaaS cost pipeline, {result.plans:,} plans (random.Random({SEED}), generated in "
        f"{result.generate_s:.1f}s), window {window}",
        f"  mix: {result.mix}",
        f"  emulator org {e.org_slug}: import_plans {_secs(e.import_s)}s, procedures.sync {_secs(e.sync_s)}s "
        f"({', '.join(f'{k} {v}' for k, v in e.sync_outcomes.items())})",
    ]
    if result.emulator_error:
        lines.append(f"  emulator part failed: {result.emulator_error}")
    if e.error:
        lines.append(f"  run {e.run_id} {e.state}: {e.error}")
    lines += [
        "",
        "| what | seconds | rows | rows/s |",
        "|---|---:|---:|---:|",
    ]
    if e.run_id:
        lines.append(
            f"| emulator: RunPipeline saas_cost until the run ends ({e.state}) | {e.wall_s:.2f} | "
            f"{e.daily_rows:,} daily + {e.focus_rows:,} FOCUS | {_rate(e.daily_rows, e.wall_s)} daily |"
        )
        lines.append(f"| emulator: run start→end (server) | {e.server_s:.2f} | | |")
        for step_id, state, seconds, rows_written in e.steps:
            rows = e.daily_rows if step_id == "calculate_daily_costs" else e.focus_rows
            what = "daily" if step_id == "calculate_daily_costs" else "FOCUS"
            lines.append(
                f"| emulator: step {step_id} ({state}, reported {rows_written:,}) | {seconds:.2f} | "
                f"{rows:,} {what} | {_rate(rows, seconds)} |"
            )
    if d is not None:
        lines.append(
            f"| DuckDB {d.version} in-process ({d.threads} threads): one CREATE TABLE AS SELECT | "
            f"{d.query_s:.2f} | {d.rows:,} daily | {_rate(d.rows, d.query_s)} |"
        )
        lines.append(
            f"| DuckDB: load the plans (tuples via CSV, not in the query time) | {d.load_s:.2f} | | |"
        )
    elif result.duck_error:
        lines.append(f"| DuckDB failed: {result.duck_error} | | | |")
    lines.append("")
    if d is not None and e.state == "COMPLETED":
        lines.append(
            f"  daily rows:       emulator {e.daily_rows:,} vs DuckDB {d.rows:,} -> "
            + ("equal" if result.counts_match else f"DIFFER by {d.rows - e.daily_rows:+,}")
        )
        lines.append(
            f"  SUM(daily_cost):  emulator {e.daily_total} vs DuckDB {d.total} -> "
            + (
                "equal (exact)"
                if result.totals_match
                else f"DIFFER by {(d.total or 0) - (e.daily_total or 0)} (DuckDB - emulator)"
            )
        )
        lines += [f"  {line}" for line in result.differences]
    ratio = result.ratio
    if ratio is not None:
        daily_step = e.step_seconds("calculate_daily_costs")
        step_ratio = f"; daily step alone {daily_step / d.query_s:.1f}x" if d and daily_step else ""
        lines.append(f"  emulator run wall / DuckDB query: {ratio:.1f}x{step_ratio}")
    lines.append(f"  SaaS part took {result.elapsed_s:.1f}s")
    return lines


def markdown(result: SaasResult, host: str) -> str:
    """The Markdown block for the README."""
    e, d = result.emulator, result.duck
    lines = [
        "### SaaS cost pipeline at scale (`make bench`, or `python -m bench saas` alone)",
        "",
        f"One run on {host}.",
        f"{result.plans:,} generated plans (`random.Random({SEED})`: every billing cycle, per_seat and",
        "flat_fee, percent/fixed/no discount, anchor days incl. 29-31, end dates, cancelled, expired and",
        f"pending plans), `saas_cost` over {WINDOW_START}..{WINDOW_END} (365 days) on the",
        "BigQuery emulator, against the same daily expansion as one `CREATE TABLE AS SELECT` in DuckDB",
        "in-process (integer nano-units, `DECIMAL(38,9)`):",
        "",
        "| what | seconds | rows | rows/s |",
        "|---|---:|---:|---:|",
    ]
    if e.run_id:
        lines.append(
            f"| emulator, whole run (RunPipeline call to run end, {e.state}) | {e.wall_s:.2f} | "
            f"{e.daily_rows:,} daily + {e.focus_rows:,} FOCUS | {_rate(e.daily_rows, e.wall_s)} |"
        )
        for step_id, _, seconds, _ in e.steps:
            rows = e.daily_rows if step_id == "calculate_daily_costs" else e.focus_rows
            lines.append(
                f"| emulator, step `{step_id}` | {seconds:.2f} | {rows:,} | {_rate(rows, seconds)} |"
            )
    if d is not None:
        lines.append(
            f"| DuckDB {d.version}, one query ({d.threads} threads) | {d.query_s:.2f} | {d.rows:,} | "
            f"{_rate(d.rows, d.query_s)} |"
        )
    lines.append("")
    if d is not None and e.state == "COMPLETED":
        same = result.counts_match and result.totals_match
        check = (
            f"Same rows and the same SUM(daily_cost) to the nano-unit ({e.daily_total})."
            if same
            else (
                f"Rows {e.daily_rows:,} vs {d.rows:,}, SUM(daily_cost) {e.daily_total} vs {d.total} "
                f"(emulator vs DuckDB): they DIFFER."
            )
        )
        ratio, daily_step = result.ratio, e.step_seconds("calculate_daily_costs")
        if ratio:
            step = f", the daily step alone {daily_step / d.query_s:.1f}x" if daily_step else ""
            lines.append(
                f"The emulator run takes **{ratio:.0f}x** the DuckDB query's time{step} (the FOCUS "
                "conversion has no DuckDB counterpart here)."
            )
        lines.append(check)
    return "\n".join(lines)


async def report(service: app.Service, result: SaasResult, seconds: float) -> None:
    """Measure within `seconds` (a hard cap 15 s later) and print the table, even after a cut."""
    try:
        await asyncio.wait_for(measure(service, result, seconds), seconds + 15)
    except TimeoutError:
        result.emulator_error = (
            result.emulator_error or f"cut: the part did not finish within {seconds + 15:.0f} s"
        )
    print("\n".join(table(result)))


async def main(host: str) -> int:
    """`python -m bench saas`: this part alone, on its own emulator and service; `host` describes the
    machine."""
    started = time.perf_counter()
    print(f"machine: {host}")
    stack = new_stack()
    result = SaasResult()
    try:
        await start_stack(stack)
        assert stack.service is not None
        print("startup: " + ", ".join(f"{k} {v:.1f}s" for k, v in stack.timings.items()))
        print()
        await report(stack.service, result, SAAS_SECONDS)
    finally:
        await stack.stop()
    print()
    print(f"total time {time.perf_counter() - started:.1f}s; all servers stopped")
    print()
    print(markdown(result, host))
    return 0
