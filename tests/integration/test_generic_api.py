"""`generic.api_extractor` through the real server against fake APIs on the session's fake provider (the
registry's `generic` base URL): one API per pagination style and auth scheme, 429s, auth failures, a
looping API, fan-out over a parent listing, the incremental cursor (advanced only after a successful
write), MERGE on the primary key, and the schema contract."""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from processors.base import parse_config
from processors.generic.api_extractor import ApiExtractorConfig
from server import app
from server.errors import InvalidInputError
from tests.conftest import Org, make_org
from tests.fakes.provider import FakeProvider, Reply

RS = pipeline_run_pb2
Stub = pipeline_service_pb2_grpc.PipelineServiceStub
TOKEN = "tok-" + uuid.uuid4().hex
SECRETS = {
    "token": TOKEN,
    "username": "svc-user",
    "password": "pw-" + uuid.uuid4().hex,
    "client_id": "cid-1",
    "client_secret": "cs-" + uuid.uuid4().hex,
}


def dumps(body: Any) -> str:
    """JSON with Decimals written as exact numbers (as a real API sends money)."""
    text = json.dumps(body, default=lambda d: f"__D{d:f}__")
    return re.sub(r'"__D(-?[0-9.]+)__"', r"\1", text)


def item(n: int, amount: str, updated: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"inv_{n}",
        "total": {"amount": Decimal(amount), "currency": "USD"},
        "updated_at": updated,
        **extra,
    }


ITEMS = [
    item(1, "10.5", "2026-11-01T10:00:00Z", memo="first"),
    item(2, "0.000000001", "2026-11-02T10:00:00Z"),
    item(3, "123456789.123456789", "2026-11-03T10:00:00Z"),
    item(4, "-5", "2026-11-04T10:00:00Z"),
    item(5, "7", "2026-11-05T10:00:00Z"),
]


async def org_with_secrets(service: app.Service, prefix: str, **fields: str) -> Org:
    org = await make_org(service, prefix)
    await service.vault.store.set(org.slug, "generic", {**SECRETS, **fields})
    return org


async def run(pipelines: Stub, org: Org, pipeline: str, provider: str = "generictest") -> RS.PipelineRun:
    request = pipeline_service_pb2.RunPipelineRequest(
        org_slug=org.slug, provider=provider, domain="api", pipeline=pipeline, wait=True
    )
    return (await pipelines.RunPipeline(request, metadata=org.metadata, timeout=60)).run


def completed(result: RS.PipelineRun) -> RS.PipelineRun:
    assert result.state == RS.RUN_STATE_COMPLETED, (
        result.error,
        [(s.error_reason, s.error) for s in result.steps],
    )
    return result


def failed(result: RS.PipelineRun) -> RS.StepRun:
    assert result.state == RS.RUN_STATE_FAILED, result
    return result.steps[0]


async def rows(service: app.Service, org: Org, table: str) -> list[dict[str, Any]]:
    ref = service.warehouse.table_ref(org.dataset, table)
    return await service.warehouse.query(f"SELECT * FROM {ref} ORDER BY id")


def amounts(found: list[dict[str, Any]]) -> dict[str, Decimal]:
    return {r["id"]: r["amount"] for r in found}


def expected(items: list[dict[str, Any]]) -> dict[str, Decimal]:
    return {i["id"]: i["total"]["amount"] for i in items}


def guarded(check: Callable[[web.Request], bool], answer: Callable[[web.Request], Reply]) -> Any:
    def reply(request: web.Request) -> Reply:
        if not check(request):
            return Reply(401, {"error": "bad credentials"})
        return answer(request)

    return reply


# -- one API per pagination style ---------------------------------------------------------------------


async def test_cursor_pages_bearer_auth_429_incremental_and_merge(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    org = await org_with_secrets(service, "gxcursor")
    data = list(ITEMS)

    def page(request: web.Request) -> Reply:
        since = datetime.fromisoformat(request.query["updated_since"].replace("Z", "+00:00"))
        fresh = [i for i in data if datetime.fromisoformat(i["updated_at"].replace("Z", "+00:00")) >= since]
        start = int(request.query.get("cursor", "0"))
        chunk = fresh[start : start + 2]
        more = start + 2 < len(fresh)
        return Reply(
            200,
            dumps(
                {"data": chunk, "meta": {"has_more": more, "next_cursor": str(start + 2) if more else None}}
            ),
        )

    api = guarded(lambda r: r.headers.get("Authorization") == f"Bearer {TOKEN}", page)
    fake_provider.script("/gx/cursor/items", api, Reply(429, b"", {"Retry-After": "0"}), api)
    first = len(fake_provider.seen)
    result = completed(await run(pipelines, org, "cursor"))
    assert result.steps[0].rows_written == 5
    calls = fake_provider.requests("/gx/cursor/items")[-4:]
    assert [c.query.get("cursor") for c in calls] == [None, "2", "2", "4"]  # the 429 was retried
    assert all(c.query["status"] == "paid" and c.headers["Accept"] == "application/json" for c in calls)
    assert calls[0].query["updated_since"] == "2026-01-01T00:00:00Z"
    found = await rows(service, org, "gx_cursor_items")
    assert amounts(found) == expected(ITEMS)
    assert found[0]["x_extra"] == {"memo": "first"} and found[1]["x_extra"] is None
    assert found[0]["updated_at"] == datetime(2026, 11, 1, 10, tzinfo=UTC)
    assert len(fake_provider.seen) > first

    # the next run asks from the stored cursor minus the lag, updates a changed row, adds a new one
    data[4] = item(5, "8.25", "2026-11-06T09:00:00Z")
    data.append(item(6, "1", "2026-11-06T10:00:00Z"))
    fake_provider.script("/gx/cursor/items", api)
    again = completed(await run(pipelines, org, "cursor"))
    assert fake_provider.requests("/gx/cursor/items")[-1].query["updated_since"] == "2026-11-05T09:00:00Z"
    assert again.steps[0].rows_written == 2  # item 5 changed, item 6 new: merged on id
    found = await rows(service, org, "gx_cursor_items")
    assert amounts(found) == expected(data) and len(found) == 6

    # a wrong token: CREDENTIAL_REJECTED, the rows and the cursor stay
    await service.vault.store.set(org.slug, "generic", {**SECRETS, "token": "tok-wrong-" + uuid.uuid4().hex})
    service.vault.forget(org.slug)
    step = failed(await run(pipelines, org, "cursor"))
    assert step.error_reason == "CREDENTIAL_REJECTED" and "tok-wrong" not in step.error
    await service.vault.store.set(org.slug, "generic", SECRETS)
    service.vault.forget(org.slug)
    completed(await run(pipelines, org, "cursor"))
    assert fake_provider.requests("/gx/cursor/items")[-1].query["updated_since"] == "2026-11-06T09:00:00Z"


async def test_header_cursor_and_header_auth(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    org = await org_with_secrets(service, "gxheader")

    def page(request: web.Request) -> Reply:
        start = int(request.query.get("after", "0"))
        headers = {"X-Next-Cursor": str(start + 3)} if start + 3 < len(ITEMS) else {}
        return Reply(200, dumps({"items": ITEMS[start : start + 3]}), headers)

    fake_provider.script("/gx/header/items", guarded(lambda r: r.headers.get("X-Api-Key") == TOKEN, page))
    assert completed(await run(pipelines, org, "header_cursor")).steps[0].rows_written == 5
    assert amounts(await rows(service, org, "gx_header_items")) == expected(ITEMS)


async def test_next_url_in_the_body_and_query_key(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    org = await org_with_secrets(service, "gxnext")

    def page(request: web.Request) -> Reply:
        start = int(request.query.get("from", "0"))
        following = f"{fake_provider.url}/gx/next/items?from={start + 2}" if start + 2 < len(ITEMS) else None
        return Reply(200, dumps({"results": ITEMS[start : start + 2], "links": {"next": following}}))

    fake_provider.script("/gx/next/items", guarded(lambda r: r.query.get("api_key") == TOKEN, page))
    assert completed(await run(pipelines, org, "next_url")).steps[0].rows_written == 5
    assert [c.query.get("from") for c in fake_provider.requests("/gx/next/items")[-3:]] == [None, "2", "4"]


async def test_link_header_and_basic_auth(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    org = await org_with_secrets(service, "gxlink")
    basic = "Basic " + base64.b64encode(f"svc-user:{SECRETS['password']}".encode()).decode()

    def page(request: web.Request) -> Reply:
        number = int(request.query.get("page", "1"))
        link = (
            {"Link": f'<{fake_provider.url}/gx/link/items?page={number + 1}>; rel="next"'}
            if number < 3
            else {}
        )
        return Reply(200, dumps(ITEMS[(number - 1) * 2 : number * 2]), link)

    fake_provider.script("/gx/link/items", guarded(lambda r: r.headers.get("Authorization") == basic, page))
    assert completed(await run(pipelines, org, "link_header")).steps[0].rows_written == 5
    assert amounts(await rows(service, org, "gx_link_items")) == expected(ITEMS)


async def test_offset_limit_a_looping_api_and_the_schema_contract(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    org = await org_with_secrets(service, "gxoffset")
    plain = [{k: v for k, v in i.items() if k != "memo"} for i in ITEMS]

    def page(request: web.Request) -> Reply:
        offset, limit = int(request.query["offset"]), int(request.query["limit"])
        return Reply(200, dumps({"data": plain[offset : offset + limit]}))

    fake_provider.script("/gx/offset/items", page)
    assert completed(await run(pipelines, org, "offset")).steps[0].rows_written == 5
    assert [c.query["offset"] for c in fake_provider.requests("/gx/offset/items")[-3:]] == ["0", "2", "4"]

    # an API that ignores the offset answers the same page forever
    fake_provider.script("/gx/offset/items", Reply(200, dumps({"data": plain[:2]})))
    assert failed(await run(pipelines, org, "offset")).error_reason == "PAGINATION_LOOP"

    # a field outside the contract is rejected (unknown_fields: reject), a bad amount too; nothing is written
    before = await rows(service, org, "gx_offset_items")
    fake_provider.script("/gx/offset/items", Reply(200, dumps({"data": [ITEMS[0]]})))
    step = failed(await run(pipelines, org, "offset"))
    assert step.error_reason == "SCHEMA_CONTRACT_VIOLATION" and "memo" in step.error
    fake_provider.script(
        "/gx/offset/items", Reply(200, dumps({"data": [item(9, "0.0000000001", "2026-11-01T00:00:00Z")]}))
    )
    step = failed(await run(pipelines, org, "offset"))
    assert (
        step.error_reason == "SCHEMA_CONTRACT_VIOLATION"
        and "amount" in step.error
        and "0.0000000001" not in step.error
    )
    assert await rows(service, org, "gx_offset_items") == before


async def test_page_numbers_with_oauth2_refreshed_after_a_401(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    org = await org_with_secrets(service, "gxpage")
    minted: list[str] = []
    revoked: set[str] = set()
    client = "Basic " + base64.b64encode(f"cid-1:{SECRETS['client_secret']}".encode()).decode()

    async def token(request: web.Request) -> Reply:
        form = dict(await request.post())
        if request.headers.get("Authorization") != client or form.get("grant_type") != "client_credentials":
            return Reply(401, {"error": "invalid_client"})
        assert form.get("scope") == "invoices.read"
        minted.append(f"at-{len(minted) + 1}")
        return Reply(200, {"access_token": minted[-1], "expires_in": 3600, "token_type": "bearer"})

    def page(request: web.Request) -> Reply:
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if bearer not in minted or bearer in revoked:
            return Reply(401, {"error": "token expired"})
        number, size = int(request.query["page"]), int(request.query["per_page"])
        return Reply(200, dumps({"data": ITEMS[(number - 1) * size : number * size]}))

    fake_provider.script("/gx/page/token", token)
    fake_provider.script("/gx/page/items", page)
    assert completed(await run(pipelines, org, "page_number")).steps[0].rows_written == 5
    assert len(minted) == 1
    assert [c.query["page"] for c in fake_provider.requests("/gx/page/items")[-3:]] == ["1", "2", "3"]

    revoked.add(minted[0])  # the cached token is revoked: one 401, a new token, the same rows
    assert completed(await run(pipelines, org, "page_number")).steps[0].rows_written == 5
    assert len(minted) == 2

    await service.vault.store.set(org.slug, "generic", {**SECRETS, "client_secret": "cs-wrong"})
    service.vault.forget(org.slug)
    revoked.add(minted[1])
    step = failed(await run(pipelines, org, "page_number"))
    assert step.error_reason == "CREDENTIAL_REJECTED" and "cs-wrong" not in step.error


async def test_fan_out_walks_each_parent_afresh_with_its_own_cursor(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    org = await org_with_secrets(service, "gxfan")
    invoices = {
        "acct/1": [item(10 + n, f"{n}.5", "2026-11-01T00:00:00Z", seq=n) for n in range(1, 4)],
        "acct 2": [item(20 + n, f"{n}", "2026-11-01T00:00:00Z", seq=100 + n) for n in range(1, 3)],
    }
    fake_provider.script("/gx/accounts", Reply(200, dumps({"data": [{"id": "acct/1"}, {"id": "acct 2"}]})))

    def children(parent: str) -> Callable[[web.Request], Reply]:
        def page(request: web.Request) -> Reply:
            since = int(request.query["since_seq"])
            fresh = [i for i in invoices[parent] if i["seq"] > since]
            start = int(request.query.get("cursor", "0"))
            following = str(start + 2) if start + 2 < len(fresh) else ""
            return Reply(200, dumps({"data": fresh[start : start + 2], "next": following}))

        return page

    # the values are percent-encoded into the path (acct%2F1); the fake sees the decoded path
    fake_provider.script("/gx/accounts/acct/1/invoices", children("acct/1"))
    fake_provider.script("/gx/accounts/acct 2/invoices", children("acct 2"))
    result = completed(await run(pipelines, org, "fan_out"))
    assert result.steps[0].rows_written == 5
    found = await rows(service, org, "gx_fan_out_invoices")
    assert {r["id"]: r["x_parent"] for r in found} == {
        "inv_11": "acct/1",
        "inv_12": "acct/1",
        "inv_13": "acct/1",
        "inv_21": "acct 2",
        "inv_22": "acct 2",
    }
    first_calls = [c for c in fake_provider.seen if c.path.startswith("/gx/accounts/acct")]
    assert sorted(c.query.get("cursor", "") for c in first_calls) == ["", "", "2"]  # a fresh walk per parent
    # each parent keeps its own cursor
    invoices["acct/1"].append(item(14, "4", "2026-11-02T00:00:00Z", seq=4))
    completed(await run(pipelines, org, "fan_out"))
    latest = {
        c.path: c.query["since_seq"] for c in fake_provider.seen if c.path.startswith("/gx/accounts/acct")
    }
    assert latest == {"/gx/accounts/acct/1/invoices": "3", "/gx/accounts/acct 2/invoices": "102"}
    assert len(await rows(service, org, "gx_fan_out_invoices")) == 6


def test_configs_are_validated_when_loaded() -> None:
    base: dict[str, Any] = {
        "request": {"path": "/v1/x"},
        "table": "t",
        "primary_key": ["id"],
        "columns": [{"name": "id"}],
    }
    assert parse_config(ApiExtractorConfig, base)
    bad = [
        ({"pagination": {"type": "cursor", "cursor_param": "c"}}, "pagination"),
        ({"primary_key": ["nope"]}, ""),
        ({"for_each": {"values": ["a"]}}, ""),
        ({"auth": {"type": "header", "field": "token"}}, "auth.header.name"),
        ({"request": {"path": "/v1/x", "headers": {"Authorization": "Bearer x"}}}, "request"),
        ({"records": "$..data[?(@.x)]"}, "records"),
        (
            {"incremental": {"cursor_path": "u", "param": "since", "initial_value": "yesterday"}},
            "incremental",
        ),
        ({"columns": [{"name": "id", "type": "FLOAT64"}]}, "columns.0.type"),
        ({"surprise": 1}, "surprise"),
    ]
    for change, field in bad:
        with pytest.raises(InvalidInputError) as caught:
            parse_config(ApiExtractorConfig, {**base, **change})
        assert any(field in v.field for v in caught.value.violations), (change, caught.value.violations)


async def test_the_shipped_example_is_valid(service: app.Service) -> None:
    config = service.catalog.get("generic", "api", "vendor_invoices")
    step = config.spec.steps[0]
    parsed = parse_config(ApiExtractorConfig, step.config)
    assert parsed.pagination.type == "link_header" and parsed.primary_key == ["id"]
