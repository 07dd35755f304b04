"""Pages of the provider APIs into raw rows, and the run window: pure functions, no I/O."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from processors.anthropic import cost as anthropic_cost
from processors.anthropic import usage as anthropic_usage
from processors.genai import focus, ingest
from processors.openai import cost as openai_cost
from processors.openai import usage as openai_usage
from server.errors import InvalidInputError, TerminalError

LINEAGE = {"x_pipeline_id": "p", "x_run_id": "r", "x_credential_id": "c", "x_ingested_at": datetime.now(UTC)}
NOV_2 = 1_793_577_600  # 2026-11-02T00:00:00Z


def exact(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


def test_openai_usage_page_keeps_empty_buckets_and_unknown_fields() -> None:
    page = exact(
        json.dumps(
            {
                "object": "page",
                "data": [
                    {"object": "bucket", "start_time": NOV_2, "end_time": NOV_2 + 86_400, "results": []},
                    {
                        "object": "bucket",
                        "start_time": NOV_2 + 86_400,
                        "end_time": NOV_2 + 2 * 86_400,
                        "results": [
                            {
                                "object": "organization.usage.completions.result",
                                "input_tokens": 18_450_000,
                                "input_cached_tokens": 12_300_000,
                                "output_tokens": 1_240_000,
                                "num_model_requests": 7,
                                "project_id": "proj_1",
                                "model": "gpt-5.5",
                                "batch": False,
                                "service_tier": "default",
                                "api_source": "agents_api",
                                "brand_new_metric": 3,
                            }
                        ],
                    },
                ],
                "has_more": False,
                "next_page": None,
            }
        )
    )
    cols = {
        k: v.values() if isinstance(v, ingest.Runs) else v
        for k, v in openai_usage.columns_of_page("completions", page, LINEAGE).items()
    }
    assert {len(v) for v in cols.values()} == {2}
    assert cols["is_empty_bucket"] == [True, False]
    assert cols["usage_date"] == [date(2026, 11, 2), date(2026, 11, 3)]
    assert cols["input_tokens"] == [None, 18_450_000] and cols["api_source"] == [None, "agents_api"]
    assert cols["extra"] == [{}, {"brand_new_metric": 3}] and cols["user_id"] == [None, None]
    assert cols["endpoint"] == ["completions"] * 2 and cols["x_run_id"] == [LINEAGE["x_run_id"]] * 2


@pytest.mark.parametrize(
    "page",
    [
        {"object": "page"},
        {"data": [{"start_time": NOV_2}]},
        {"data": [{"start_time": NOV_2, "end_time": NOV_2 + 86_400, "results": [{"input_tokens": "12"}]}]},
        {"data": [{"start_time": NOV_2, "end_time": NOV_2 + 86_400, "results": [{"input_tokens": 1.5}]}]},
        {"data": [{"start_time": NOV_2, "end_time": NOV_2 + 86_400, "results": [{"input_tokens": True}]}]},
        {"data": [{"start_time": NOV_2, "end_time": NOV_2 + 86_400, "results": [[1, 2]]}]},
    ],
)
def test_a_malformed_page_fails_instead_of_being_skipped(page: dict[str, Any]) -> None:
    with pytest.raises(TerminalError) as caught:
        openai_usage.columns_of_page("completions", page, LINEAGE)
    assert caught.value.reason == "PROVIDER_BAD_RESPONSE"


def test_openai_cost_amount_is_exact_decimal() -> None:
    page = exact(
        '{"data": [{"start_time": START, "end_time": END, "results": [{"object": "organization.costs.result",'
        " "
        '"amount": {"value": 0.5617712500000000, "currency": "usd"}, "line_item": "gpt-5.5, input", '
        '"project_id": "proj_1", "quantity": 112354, "quantity_unit": "tokens"}]}]}'.replace(
            "START", str(NOV_2)
        ).replace("END", str(NOV_2 + 86_400))
    )
    (row,) = openai_cost.rows_of_page(page, LINEAGE)
    assert row["amount"] == Decimal("0.56177125") and row["currency"] == "USD" and row["quantity"] == 112354
    with pytest.raises(TerminalError):
        openai_cost.rows_of_page(
            {
                "data": [
                    {
                        "start_time": NOV_2,
                        "end_time": NOV_2 + 86_400,
                        "results": [{"amount": {"value": True}}],
                    }
                ]
            },
            LINEAGE,
        )


def test_anthropic_rows_flatten_cache_creation_and_convert_cents() -> None:
    bucket = {"starting_at": "2026-11-02T00:00:00Z", "ending_at": "2026-11-03T00:00:00Z"}
    usage_page = {
        "data": [
            {
                **bucket,
                "results": [
                    {
                        "uncached_input_tokens": 8_250_000,
                        "cache_creation": {
                            "ephemeral_5m_input_tokens": 1_120_000,
                            "ephemeral_1h_input_tokens": 400_000,
                        },
                        "cache_read_input_tokens": 36_800_000,
                        "output_tokens": 2_310_000,
                        "server_tool_use": {"web_search_requests": 4},
                        "workspace_id": None,
                        "model": "claude-sonnet-4-6",
                        "service_tier": "standard",
                        "context_window": "0-200k",
                        "speed": "standard",
                        "new_dimension": "x",
                    }
                ],
            }
        ]
    }
    (row,) = anthropic_usage.rows_of_page(usage_page, LINEAGE)
    assert (row["cache_creation_5m_input_tokens"], row["cache_creation_1h_input_tokens"]) == (
        1_120_000,
        400_000,
    )
    assert (
        row["web_search_requests"] == 4
        and row["workspace_id"] is None
        and row["extra"] == {"new_dimension": "x"}
    )
    cost_page = {
        "data": [{**bucket, "results": [{"amount": "1104.00", "currency": "USD", "token_type": "x"}]}]
    }
    (cost,) = anthropic_cost.rows_of_page(cost_page, LINEAGE)
    assert cost["amount_cents"] == Decimal("1104.00") and cost["amount"] == Decimal("11.04")
    for bad in ("12,5", "NaN", 1.5, None):
        with pytest.raises(TerminalError):
            anthropic_cost.rows_of_page({"data": [{**bucket, "results": [{"amount": bad}]}]}, LINEAGE)


def test_window_trailing_days_and_refusals() -> None:
    today = date(2026, 11, 30)
    assert ingest.window(ingest.WindowConfig(), today) == (date(2026, 11, 28), today)
    assert ingest.window(ingest.WindowConfig(trailing_days=1), today) == (today, today)
    config = ingest.WindowConfig(start_date="2026-11-01", end_date="2026-11-08")
    assert ingest.window(config, today) == (date(2026, 11, 1), date(2026, 11, 8))
    for start, end in (("2026-11-01", "2026-12-01"), ("2026-11-09", "2026-11-08"), ("2026-13-01", "")):
        with pytest.raises(InvalidInputError):
            ingest.window(ingest.WindowConfig(start_date=start, end_date=end), today)


def test_focus_row_money_and_a_full_discount() -> None:
    line = focus.Line(
        date(2026, 11, 2),
        None,
        "anthropic:claude-sonnet-4-5:cache_read",
        "standard:base",
        "cache_read",
        "Claude Sonnet 4.5 Usage - Cache Read",
        Decimal("11.04"),
        "Cache Read Tokens",
        "standard",
        "0-200k",
    )
    line.quantity, line.pricing_unit = Decimal("36.8"), "1000000 Tokens"
    line.list_price, line.contracted_price = Decimal("0.3"), Decimal(0)  # a 100 % discount override
    row = focus.focus_row(line, "anthropic", "org-1", {}, "0.2.3", LINEAGE)
    assert (row["ListCost"], row["ContractedCost"], row["BilledCost"]) == (
        Decimal("11.04"),
        0,
        Decimal("11.04"),
    )
    assert row["SubAccountId"] == "default" and row["SubAccountName"] == "Default"
    assert row["ChargePeriodEnd"] - row["ChargePeriodStart"] == timedelta(days=1)
    assert (row["BillingPeriodStart"].day, row["BillingPeriodEnd"].month) == (1, 12)
    assert row["SkuPriceId"] == "anthropic:claude-sonnet-4-5:cache_read:standard:base"
