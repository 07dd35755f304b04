"""OpenAI and Anthropic usage/cost pipelines end to end: real server, Envoy, emulator, provider sandbox.

The sandbox (server/localstack/providers.py) bills its synthetic usage with its own prices, which equal
the pinned genai-prices rates for the models it uses; so the expected figures below come from the
sandbox's own functions, independently of the pipeline: per day, the FOCUS table's BilledCost must equal
the cost API's amounts exactly, and the reconciliation's difference must be exactly the long-context
uplift (OpenAI; invisible in usage) or zero (Anthropic, whose Priority Tier usage becomes estimates).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server import app, prices
from server.localstack import providers as sandbox_data
from server.localstack.providers import ProviderSandbox
from server.settings import PROJECT_ROOT
from server.warehouse.schema import load_schema
from tests import focus_validator
from tests.conftest import Org, make_org
from tests.integration import runs

FOCUS = load_schema(PROJECT_ROOT / "configs" / "schemas" / "org" / "cost_data_focus_1_2.json")
START, END = date(2026, 11, 10), date(2026, 11, 16)  # after the catalog's tier variants (2026-10-14)
DAYS = [START + timedelta(days=i) for i in range((END - START).days + 1)]
KNOWN_VALIDATOR_FALSE_POSITIVES = frozenset({"InvoiceId-C-005-C"})  # see test_saas_focus.py


@dataclass
class GenAIOrg:
    org: Org
    seed: str
    key: str
    credential_id: str


async def genai_org(
    service: app.Service, sandbox: ProviderSandbox, provider: str, *, with_credential: bool = True
) -> GenAIOrg:
    org = await make_org(service, f"genai_{provider}")
    seed = uuid.uuid4().hex[:8]
    key = ("sk-ant-admin01-" if provider == "anthropic" else "sk-admin-") + uuid.uuid4().hex
    getattr(sandbox, provider).keys[key] = seed
    credential_id = ""
    if with_credential:
        stored = await service.vault.store.set(org.slug, provider, {"admin_api_key": key})
        credential_id = stored.credential_id
    return GenAIOrg(org, seed, key, credential_id)


async def run(stub: runs.Stub, org: Org, provider: str, start: date = START, end: date = END) -> Any:
    accepted = await stub.RunPipeline(
        runs.PS.RunPipelineRequest(
            org_slug=org.slug,
            provider=provider,
            domain="cost",
            pipeline="usage_cost",
            start_date=start.isoformat(),
            end_date=end.isoformat(),
        ),
        metadata=org.metadata,
        timeout=30,
    )
    return await runs.wait_terminal(stub, org, accepted.run.run_id, timeout=240)


async def rows(service: app.Service, dataset: str, table: str, where: str = "TRUE") -> list[dict[str, Any]]:
    return await service.warehouse.query(
        f"SELECT * FROM {service.warehouse.table_ref(dataset, table)} WHERE {where}"
    )


def steps_of(run_: Any) -> list[tuple[str, str, str]]:
    return [(s.step_id, s.error_reason, s.error) for s in run_.steps]


def step(run_: Any, step_id: str) -> Any:
    return next(s for s in run_.steps if s.step_id == step_id)


def by_day(items: list[dict[str, Any]], column: str, value: str) -> dict[date, Decimal]:
    out: dict[date, Decimal] = defaultdict(Decimal)
    for r in items:
        out[r[column]] += Decimal(r[value])
    return dict(out)


def openai_expected(seed: str) -> tuple[dict[date, Decimal], dict[date, Decimal]]:
    """Per day: the cost API's total and the long-context uplift (billed minus base-rate price)."""
    billed: dict[date, Decimal] = defaultdict(Decimal)
    uplift: dict[date, Decimal] = defaultdict(Decimal)
    for day in DAYS:
        for line in sandbox_data.openai_cost_lines(seed, day):
            billed[day] += line["amount"]
            if line["line_item"].endswith("long context"):
                base = sandbox_data.openai_line_amount(
                    line["line_item"].removesuffix(", long context"), line["quantity"]
                )
                uplift[day] += line["amount"] - base
    return {d: v for d, v in billed.items() if v}, dict(uplift)


def anthropic_expected(seed: str) -> dict[date, Decimal]:
    billed: dict[date, Decimal] = defaultdict(Decimal)
    for day in DAYS:
        for line in sandbox_data.anthropic_cost_lines(seed, day):
            billed[day] += line["cents"] / 100
    return {d: v for d, v in billed.items() if v}


def anthropic_priority_estimate(seed: str) -> dict[date, Decimal]:
    """Per day: Priority Tier usage at the standard rates (the sandbox's prices equal the catalog's)."""
    out: dict[date, Decimal] = defaultdict(Decimal)
    for day in DAYS:
        for rec in sandbox_data.anthropic_records(seed, day):
            if rec["service_tier"] == "priority":
                prices = sandbox_data.ANTHROPIC_PRICES[(rec["model"], "standard", rec["context_window"])]
                for token_type, price in zip(sandbox_data.ANTHROPIC_TOKEN_TYPES, prices, strict=True):
                    out[day] += rec[token_type] * price / 1_000_000
    return dict(out)


def without_lineage(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    skip = {"x_RunId", "x_IngestedAt", "SkuPriceDetails", "Tags"}
    return sorted(tuple(sorted((k, str(v)) for k, v in r.items() if k not in skip)) for r in items)


# --- OpenAI ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def openai_run(
    service: app.Service, provider_sandbox: ProviderSandbox, pipelines: runs.Stub
) -> tuple[GenAIOrg, Any]:
    org = await genai_org(service, provider_sandbox, "openai")
    return org, await run(pipelines, org.org, "openai")


@pytest.mark.timeout(300)
async def test_openai_pipeline_lands_every_dollar_in_focus(
    service: app.Service, openai_run: tuple[GenAIOrg, Any]
) -> None:
    org, finished = openai_run
    assert finished.state == runs.RS.RUN_STATE_COMPLETED, finished
    dataset = org.org.dataset
    usage = await rows(service, dataset, "openai_usage_daily_raw")
    assert {r["endpoint"] for r in usage} == set(sandbox_data.OPENAI_ENDPOINTS)
    assert all(r["x_credential_id"] == org.credential_id and r["x_run_id"] == finished.run_id for r in usage)
    empty_days = {d for d in DAYS if sandbox_data._empty_day(org.seed, d)}
    assert {r["usage_date"] for r in usage if r["is_empty_bucket"]} >= empty_days  # kept: they prove zero
    real = [r for r in usage if not r["is_empty_bucket"]]
    assert real and all(r["extra"] == {"sandbox_note": "unknown field"} for r in real)  # tolerated, kept
    completions = [r for r in real if r["endpoint"] == "completions"]
    assert all(
        r["input_tokens"]
        == r["input_uncached_tokens"] + r["input_cached_tokens"] + r["input_cache_write_tokens"]
        for r in completions
    )
    expected, uplift = openai_expected(org.seed)
    costs = await rows(service, dataset, "openai_costs_daily_raw", "NOT is_empty_bucket")
    assert by_day(costs, "cost_date", "amount") == expected
    focus = await rows(service, dataset, "cost_data_focus_1_2", "x_SourceSystem = 'openai'")
    # the invariant: per day, FOCUS BilledCost = the cost API's amounts, to the last digit
    assert by_day(focus, "x_ChargeDate", "BilledCost") == expected
    assert all(r["EffectiveCost"] == r["BilledCost"] and r["ChargeCategory"] == "Usage" for r in focus)
    for r in focus:
        assert r["ListUnitPrice"] is not None, r["SkuPriceId"]
        assert r["ListCost"] == r["ListUnitPrice"] * r["PricingQuantity"], r["SkuPriceId"]
        assert r["PricingUnit"] == "1000000 Tokens" and r["ConsumedUnit"] == "Tokens"
        assert r["PricingQuantity"] * 1_000_000 == r["ConsumedQuantity"]
    # grain: one row per day x project x SKU price; names from the projects list (archived included)
    keys = [(r["x_ChargeDate"], r["SubAccountId"], r["SkuPriceId"]) for r in focus]
    assert len(keys) == len(set(keys))
    assert {r["SubAccountName"] for r in focus} == {"Alpha", "Beta"}
    long_rows = [r for r in focus if r["x_ContextWindow"] == "long_context"]
    assert bool(long_rows) == bool(uplift)  # the seed decides whether any request went over 272K
    assert all(r["ListCost"] == r["BilledCost"] for r in long_rows)  # billed at the 2x / 1.5x tier rates
    batch = [r for r in focus if r["SkuPriceId"] == "openai:gpt-5.5-2026-04-23:cached_input:batch:base"]
    assert batch and {r["ListUnitPrice"] for r in batch} == {Decimal("0.25")}
    # reconciliation: priced usage misses exactly the long-context uplift; flagged beyond 1 %
    recon = {r["recon_date"]: r for r in await rows(service, dataset, "genai_cost_reconciliation")}
    assert set(recon) == set(expected)
    for day, r in recon.items():
        assert r["billed_cost"] == r["focus_billed_cost"] == expected[day]
        assert r["difference"] == uplift.get(day, 0), day
        assert r["flagged"] == (abs(r["difference"]) > max(Decimal("0.01"), expected[day] / 100))
    focus_step = step(finished, "focus")
    assert focus_step.rows_written == len(focus)


@pytest.mark.timeout(300)
async def test_openai_rerun_is_idempotent_and_a_failed_run_keeps_old_rows(
    service: app.Service,
    provider_sandbox: ProviderSandbox,
    pipelines: runs.Stub,
    openai_run: tuple[GenAIOrg, Any],
) -> None:
    org, first = openai_run
    dataset = org.org.dataset
    before = await rows(service, dataset, "cost_data_focus_1_2", "x_SourceSystem = 'openai'")
    again = await run(pipelines, org.org, "openai")
    assert again.state == runs.RS.RUN_STATE_COMPLETED
    after = await rows(service, dataset, "cost_data_focus_1_2", "x_SourceSystem = 'openai'")
    assert without_lineage(after) == without_lineage(before) and {r["x_RunId"] for r in after} == {
        again.run_id
    }
    # a malformed costs page: the cost step fails, the FOCUS and cost rows of the last good run stay
    provider_sandbox.faults.add("/v1/organization/costs", "malformed")
    broken = await run(pipelines, org.org, "openai")
    assert broken.state == runs.RS.RUN_STATE_FAILED
    assert step(broken, "cost").error_reason == "PROVIDER_BAD_RESPONSE"
    kept = await rows(service, dataset, "cost_data_focus_1_2", "x_SourceSystem = 'openai'")
    assert without_lineage(kept) == without_lineage(before) and {r["x_RunId"] for r in kept} == {again.run_id}
    costs = await rows(service, dataset, "openai_costs_daily_raw")
    assert {r["x_run_id"] for r in costs} == {again.run_id}
    # a repeated cursor is an error, not an endless loop
    provider_sandbox.faults.add("/v1/organization/usage/completions", "repeat_cursor", times=2)
    looping = await run(pipelines, org.org, "openai")
    assert looping.state == runs.RS.RUN_STATE_FAILED
    assert step(looping, "usage").error_reason == "PAGINATION_LOOP"
    provider_sandbox.faults.clear()
    assert first.run_id != again.run_id


@pytest.mark.timeout(300)
async def test_openai_survives_429_and_5xx(
    service: app.Service, provider_sandbox: ProviderSandbox, pipelines: runs.Stub
) -> None:
    org = await genai_org(service, provider_sandbox, "openai")
    provider_sandbox.faults.add("/v1/organization/usage/embeddings", "429", retry_after=1)
    provider_sandbox.faults.add("/v1/organization/costs", "503")
    provider_sandbox.faults.add("/v1/organization/projects", "500")
    day = END
    finished = await run(pipelines, org.org, "openai", day, day)
    assert finished.state == runs.RS.RUN_STATE_COMPLETED, steps_of(finished)
    served = [kind for _, kind in provider_sandbox.faults.served[-3:]]
    assert sorted(served) == ["429", "500", "503"]
    expected, _ = openai_expected(org.seed)
    focus = await rows(service, org.org.dataset, "cost_data_focus_1_2")
    assert by_day(focus, "x_ChargeDate", "BilledCost") == {d: v for d, v in expected.items() if d == day}


# --- credentials -------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_missing_and_rejected_credentials_fail_at_once(
    service: app.Service,
    provider_sandbox: ProviderSandbox,
    pipelines: runs.Stub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nobody = await genai_org(service, provider_sandbox, "openai", with_credential=False)
    failed = await run(pipelines, nobody.org, "openai", END, END)
    usage = step(failed, "usage")
    assert failed.state == runs.RS.RUN_STATE_FAILED and usage.error_reason == "CREDENTIAL_MISSING"
    assert usage.attempts == 1 and "credentials set" in usage.error
    org = await genai_org(service, provider_sandbox, "anthropic")
    del provider_sandbox.anthropic.keys[org.key]  # the provider no longer accepts it
    caplog.set_level(logging.DEBUG)
    before = len(provider_sandbox.anthropic.requests)
    rejected = await run(pipelines, org.org, "anthropic", END, END)
    usage = step(rejected, "usage")
    assert rejected.state == runs.RS.RUN_STATE_FAILED and usage.error_reason == "CREDENTIAL_REJECTED"
    assert usage.attempts == 1 and len(provider_sandbox.anthropic.requests) == before + 1  # no retry
    assert org.key not in usage.error
    assert not [r for r in caplog.records if org.key in r.getMessage()]  # the secret is never logged


@pytest.mark.timeout(120)
async def test_future_days_are_refused(
    http: aiohttp.ClientSession, service: app.Service, provider_sandbox: ProviderSandbox
) -> None:
    org = await genai_org(service, provider_sandbox, "openai")
    tomorrow = date.today() + timedelta(days=2)
    async with http.post(
        f"/api/v1/pipelines/run/{org.org.slug}/openai/cost/usage_cost",
        headers=org.org.headers,
        json={"start_date": START.isoformat(), "end_date": tomorrow.isoformat()},
    ) as response:
        assert response.status == 400, await response.text()
        body = await response.json()
    assert "in the future" in str(body) and "end_date" in str(body)


# --- Anthropic ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def anthropic_run(
    service: app.Service, provider_sandbox: ProviderSandbox, pipelines: runs.Stub
) -> tuple[GenAIOrg, Any]:
    org = await genai_org(service, provider_sandbox, "anthropic")
    return org, await run(pipelines, org.org, "anthropic")


@pytest.mark.timeout(300)
async def test_anthropic_pipeline_with_priority_estimates(
    service: app.Service, anthropic_run: tuple[GenAIOrg, Any]
) -> None:
    org, finished = anthropic_run
    assert finished.state == runs.RS.RUN_STATE_COMPLETED, finished
    dataset = org.org.dataset
    expected = anthropic_expected(org.seed)
    costs = await rows(service, dataset, "anthropic_costs_daily_raw", "NOT is_empty_bucket")
    assert by_day(costs, "cost_date", "amount") == expected
    assert all(r["amount"] * 100 == r["amount_cents"] for r in costs)
    focus = await rows(service, dataset, "cost_data_focus_1_2", "x_SourceSystem = 'anthropic'")
    assert by_day(focus, "x_ChargeDate", "BilledCost") == expected
    billed = [r for r in focus if r["x_CostSource"] == "cost_api"]
    estimates = [r for r in focus if r["x_CostSource"] == "usage_estimate"]
    assert billed and estimates
    assert all(r["BilledCost"] == 0 == r["EffectiveCost"] and r["ListCost"] > 0 for r in estimates)
    assert {r["x_ServiceTier"] for r in estimates} == {"priority"}
    assert {r["PricingCategory"] for r in estimates} == {"Committed"}
    assert {r["SubAccountId"] for r in focus} == {"wrkspc_sandbox_prod", "default"}  # Default workspace
    for r in focus:
        if r["ListUnitPrice"] is not None:
            assert r["ListCost"] == r["ListUnitPrice"] * r["PricingQuantity"]
    # list = billed on every billed token row: the join with usage gives the exact quantities
    tokens = [r for r in billed if r["x_TokenClass"] != "web_search"]
    assert tokens and all(r["ListCost"] == r["BilledCost"] for r in tokens)
    long_rows = [r for r in billed if r["x_ContextWindow"] == "200k-1M"]
    assert long_rows and {r["ListUnitPrice"] for r in long_rows if r["x_TokenClass"] == "input"} == {
        Decimal(6)
    }
    recon = await rows(service, dataset, "genai_cost_reconciliation")
    assert {r["recon_date"] for r in recon} == set(expected)
    estimates_by_day = anthropic_priority_estimate(org.seed)
    assert all(r["difference"] == 0 and not r["flagged"] for r in recon)
    assert {r["recon_date"]: r["estimated_cost"] for r in recon} == {
        d: estimates_by_day.get(d, 0) for d in expected
    }
    assert finished.steps[-1].rows_written == len(focus)


@pytest.mark.timeout(300)
async def test_two_orgs_concurrently_never_see_each_other(
    service: app.Service, provider_sandbox: ProviderSandbox, pipelines: runs.Stub
) -> None:
    a = await genai_org(service, provider_sandbox, "anthropic")
    b = await genai_org(service, provider_sandbox, "anthropic")
    first, second = await asyncio.gather(
        run(pipelines, a.org, "anthropic", START, START + timedelta(days=2)),
        run(pipelines, b.org, "anthropic", START, START + timedelta(days=2)),
    )
    assert first.state == second.state == runs.RS.RUN_STATE_COMPLETED
    for org in (a, b):
        expected = {d: v for d, v in anthropic_expected(org.seed).items() if d <= START + timedelta(days=2)}
        focus = await rows(service, org.org.dataset, "cost_data_focus_1_2")
        assert by_day(focus, "x_ChargeDate", "BilledCost") == expected
        raw = await rows(service, org.org.dataset, "anthropic_usage_daily_raw")
        assert {r["x_credential_id"] for r in raw} == {org.credential_id}
    assert anthropic_expected(a.seed) != anthropic_expected(b.seed)


# --- FOCUS conformance -------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
async def test_focus_validator_accepts_genai_rows(
    service: app.Service,
    openai_run: tuple[GenAIOrg, Any],
    anthropic_run: tuple[GenAIOrg, Any],
    tmp_path: Path,
) -> None:
    items = [
        *await rows(service, openai_run[0].org.dataset, "cost_data_focus_1_2"),
        *await rows(service, anthropic_run[0].org.dataset, "cost_data_focus_1_2"),
    ]
    assert {r["x_SourceSystem"] for r in items} == {"openai", "anthropic"}
    data = tmp_path / "rows.csv"
    assert focus_validator.write_csv(items, FOCUS.column_names, data) == len(items)
    report = await asyncio.to_thread(focus_validator.run_validator, data, tmp_path / "out.xml")
    print(report.summary())
    known = [p for p in report.problems if p.name.split(" ::")[0] in KNOWN_VALIDATOR_FALSE_POSITIVES]
    assert report.tests > 500 and report.failures + report.errors - len(known) == 0, report.summary()


@pytest.mark.timeout(300)
async def test_org_discount_override_gives_the_contracted_price(
    service: app.Service, provider_sandbox: ProviderSandbox, pipelines: runs.Stub
) -> None:
    org = await genai_org(service, provider_sandbox, "openai")
    request = prices.OverrideRequest("openai", "gpt-5.5*", token_class="output", discount_pct=Decimal(10))
    await prices.set_override(service.warehouse, org.org.dataset, request)
    day = next(  # a day on which the sandbox bills standard gpt-5.5 output (the seed is random)
        END - timedelta(days=i)
        for i in range(60)
        if any(
            line["line_item"] == "gpt-5.5-2026-04-23, output"
            for line in sandbox_data.openai_cost_lines(org.seed, END - timedelta(days=i))
        )
    )
    assert (await run(pipelines, org.org, "openai", day, day)).state == runs.RS.RUN_STATE_COMPLETED
    focus = await rows(service, org.org.dataset, "cost_data_focus_1_2")
    output = [r for r in focus if r["SkuPriceId"] == "openai:gpt-5.5-2026-04-23:output:standard:base"]
    assert output and all(r["ListUnitPrice"] == 30 and r["ContractedUnitPrice"] == 27 for r in output)
    assert all(r["ContractedCost"] == 27 * r["PricingQuantity"] for r in output)
    others = [r for r in focus if r["x_TokenClass"] != "output" and r["ListUnitPrice"] is not None]
    assert others and all(r["ContractedUnitPrice"] == r["ListUnitPrice"] for r in others)
