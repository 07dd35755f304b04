"""`gcp.api_extractor` through the real server: Cloud Billing Catalog and Resource Manager fakes (paged with
`nextPageToken`, short pages that are not the end, 429 and 503), google-auth's JWT bearer flow against the
fake token endpoint (one token for many concurrent calls, a new one after a 401), exact Money parsing, and
clean failures for a wrong or missing credential and a looping API."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from tests.conftest import Org, make_org
from tests.fakes.google import FakeGoogle, ServiceAccount

RS = pipeline_run_pb2
Stub = pipeline_service_pb2_grpc.PipelineServiceStub

SERVICES = [
    {"name": "services/6F81-5844-456A", "serviceId": "6F81-5844-456A", "displayName": "Compute Engine"},
    {"name": "services/24E6-581D-38E5", "serviceId": "24E6-581D-38E5", "displayName": "BigQuery"},
    {"name": "services/95FF-2EF5-5EA1", "serviceId": "95FF-2EF5-5EA1", "displayName": "Cloud Storage"},
]


def sku(sku_id: str, tiers: list[tuple[Any, str, int]], **extra: Any) -> dict[str, Any]:
    return {
        "name": f"services/x/skus/{sku_id}",
        "skuId": sku_id,
        "description": f"SKU {sku_id}",
        "category": {
            "serviceDisplayName": "Compute Engine",
            "resourceFamily": "Compute",
            "resourceGroup": "CPU",
            "usageType": "OnDemand",
        },
        "serviceRegions": ["us-central1", "europe-west1"],
        "pricingInfo": [
            {
                "effectiveTime": "2026-01-01T00:00:00Z",
                "summary": "old price",
                "pricingExpression": {"usageUnit": "h", "tieredRates": []},
            },
            {
                "effectiveTime": "2026-11-01T08:00:00.123Z",
                "summary": "",
                "pricingExpression": {
                    "usageUnit": "h",
                    "usageUnitDescription": "hour",
                    "baseUnit": "s",
                    "baseUnitDescription": "second",
                    "baseUnitConversionFactor": 3600,
                    "displayQuantity": 1,
                    "tieredRates": [
                        {
                            "startUsageAmount": start,
                            "unitPrice": {"currencyCode": "USD", "units": units, "nanos": nanos},
                        }
                        for start, units, nanos in tiers
                    ],
                },
                "aggregationInfo": {
                    "aggregationLevel": "ACCOUNT",
                    "aggregationInterval": "MONTHLY",
                    "aggregationCount": 1,
                },
                "currencyConversionRate": 1,
            },
        ],
        "serviceProviderName": "Google",
        "geoTaxonomy": {"type": "MULTI_REGIONAL", "regions": ["us-central1", "europe-west1"]},
        **extra,
    }


COMPUTE_SKUS = [
    sku("CP-E2-CORE", [(0, "0", 21811590)]),
    sku("CP-N2-RAM", [(0, "0", 2916000)]),
    sku("CP-GPU-A100", [(0, "2", 933908000)]),
    sku("CP-EGRESS", [(0, "0", 120000000), (1024, "0", 110000000), (10240, "0", 80000000)]),
    sku("CP-LICENSE", [(0, "12", 500000000)]),
    sku("CP-FREE", [(0, "0", 0)]),
    sku("CP-CREDIT", [(0, "-1", -750000000)]),
]
BIGQUERY_SKUS = [
    sku("BQ-ANALYSIS", [(0, "0", 0), (1, "6", 250000000)]),
    sku("BQ-STORAGE", [(0, "0", 20000000)]),
]
PROJECTS = [
    {
        "projectNumber": str(100000000000 + n),
        "projectId": f"proj-{n}",
        "lifecycleState": "ACTIVE",
        "name": f"Project {n}",
        "labels": {"env": "prod" if n % 2 else "dev", "team": f"t{n}"},
        "createTime": "2024-05-01T10:00:00.000Z",
        "parent": {"type": "folder", "id": "987654321"},
    }
    for n in range(5)
]


async def org_with_key(
    service: app.Service, fake_google: FakeGoogle, prefix: str, *, register: bool = True
) -> Org:
    org = await make_org(service, prefix)
    account = ServiceAccount.generate(f"api@{prefix}.iam.gserviceaccount.com", "customer-billing")
    if register:
        fake_google.add_service_account(account)
    await service.vault.store.set(org.slug, "gcp", account.info())
    return org


async def run(pipelines: Stub, org: Org, provider: str, pipeline: str) -> RS.PipelineRun:
    request = pipeline_service_pb2.RunPipelineRequest(
        org_slug=org.slug, provider=provider, domain="api", pipeline=pipeline, wait=True
    )
    return (await pipelines.RunPipeline(request, metadata=org.metadata, timeout=60)).run


def completed(run: RS.PipelineRun) -> RS.PipelineRun:
    assert run.state == RS.RUN_STATE_COMPLETED, (run.error, [(s.error_reason, s.error) for s in run.steps])
    return run


@pytest.fixture(autouse=True)
def google_data(fake_google: FakeGoogle) -> None:
    fake_google.catalog_services = SERVICES
    fake_google.catalog_skus = {"6F81-5844-456A": COMPUTE_SKUS, "24E6-581D-38E5": BIGQUERY_SKUS}
    fake_google.projects = PROJECTS
    fake_google.short_pages = True
    fake_google.repeat_token = False
    fake_google.failures.clear()


async def test_catalog_skus_every_page_exact_prices_one_token(
    service: app.Service, fake_google: FakeGoogle, pipelines: Stub
) -> None:
    org = await org_with_key(service, fake_google, "gcpskus")
    fake_google.fail("/v1/services/6F81-5844-456A/skus", 429, 503)
    tokens_before, seen_before = len(fake_google.token_calls), len(fake_google.seen)

    result = completed(await run(pipelines, org, "gcptest", "skus_paged"))

    assert result.steps[0].rows_written == 12  # 9 SKUs; egress has 3 tiers, BigQuery analysis 2
    assert len(fake_google.token_calls) - tokens_before == 1  # concurrent walks share one token
    calls = fake_google.seen[seen_before:]
    # pages of 3 answered with 2 items: services 2 pages, Compute 4 (+429, +503), BigQuery 1, Storage 1
    compute = [c for c in calls if c[0] == "/v1/services/6F81-5844-456A/skus"]
    assert [c[1].get("pageToken", "") for c in compute] == ["", "", "", "2", "4", "6"]
    assert all(c[1]["pageSize"] == "3" and c[1]["currencyCode"] == "USD" for c in compute)
    assert len([c for c in calls if c[0] == "/v1/services"]) == 2
    assert {c[2] for c in calls} == {f"Bearer ya29.fake-{len(fake_google.token_calls)}"}
    table = service.warehouse.table_ref(org.dataset, "gcp_billing_catalog_skus")
    rows = await service.warehouse.query(f"SELECT * FROM {table}")
    prices = {(r["sku_id"], r["tier_index"]): r["unit_price"] for r in rows}
    assert prices[("CP-E2-CORE", 0)] == Decimal("0.02181159")
    assert prices[("CP-GPU-A100", 0)] == Decimal("2.933908")
    assert prices[("CP-LICENSE", 0)] == Decimal("12.5")
    assert prices[("CP-CREDIT", 0)] == Decimal("-1.75")
    assert prices[("CP-EGRESS", 2)] == Decimal("0.08") and prices[("BQ-ANALYSIS", 1)] == Decimal("6.25")
    egress = next(r for r in rows if r["sku_id"] == "CP-EGRESS" and r["tier_index"] == 1)
    assert (
        egress["tier_start_usage_amount"] == Decimal("1024") and egress["base_unit_conversion_factor"] == 3600
    )
    assert egress["usage_unit"] == "h" and egress["service_regions"] == ["us-central1", "europe-west1"]
    assert egress["pricing_summary"] == ""  # the latest pricing info, not the older one


async def test_projects_snapshot_is_replaced_and_a_revoked_token_is_minted_again(
    service: app.Service, fake_google: FakeGoogle, pipelines: Stub
) -> None:
    org = await org_with_key(service, fake_google, "gcpprojects")
    completed(await run(pipelines, org, "gcptest", "projects_paged"))
    table = service.warehouse.table_ref(org.dataset, "gcp_projects")
    rows = await service.warehouse.query(f"SELECT * FROM {table} ORDER BY project_id")
    assert [r["project_id"] for r in rows] == [f"proj-{n}" for n in range(5)]
    assert rows[1]["labels"] == [{"key": "env", "value": "prod"}, {"key": "team", "value": "t1"}]
    assert rows[0]["project_number"] == "100000000000" and rows[0]["parent_id"] == "987654321"

    fake_google.projects = PROJECTS[:2]
    fake_google.tokens.clear()  # every token revoked: the cached one now gets a 401
    tokens_before = len(fake_google.token_calls)
    again = completed(await run(pipelines, org, "gcp", "projects"))  # the shipped config
    assert again.steps[0].rows_written == 2
    assert len(fake_google.token_calls) == tokens_before + 1
    rows = await service.warehouse.query(f"SELECT project_id FROM {table} ORDER BY project_id")
    assert [r["project_id"] for r in rows] == ["proj-0", "proj-1"]


async def failed(
    pipelines: Stub, org: Org, provider: str = "gcptest", pipeline: str = "projects_paged"
) -> Any:
    result = await run(pipelines, org, provider, pipeline)
    assert result.state == RS.RUN_STATE_FAILED, result
    return result.steps[0]


async def test_wrong_or_missing_key_and_a_looping_api_fail_cleanly(
    service: app.Service, fake_google: FakeGoogle, pipelines: Stub
) -> None:
    stranger = await org_with_key(service, fake_google, "gcpstranger", register=False)
    step = await failed(pipelines, stranger)
    assert step.error_reason == "CREDENTIAL_REJECTED" and "PRIVATE KEY" not in step.error

    bare = await make_org(service, "gcpbare")
    step = await failed(pipelines, bare)
    assert step.error_reason == "CREDENTIAL_NOT_FOUND"

    looping = await org_with_key(service, fake_google, "gcploop")
    fake_google.repeat_token = True
    step = await failed(pipelines, looping)
    assert step.error_reason == "PAGINATION_LOOP"
    table = service.warehouse.table_ref(looping.dataset, "gcp_projects")
    assert await service.warehouse.query(f"SELECT * FROM {table}") == []  # nothing half-written


async def test_the_shipped_catalog_config_runs(
    service: app.Service, fake_google: FakeGoogle, pipelines: Stub
) -> None:
    org = await org_with_key(service, fake_google, "gcpcatalog")
    result = completed(await run(pipelines, org, "gcp", "billing_catalog_skus"))
    assert result.steps[0].rows_written == 12
