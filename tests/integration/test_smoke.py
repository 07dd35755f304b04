from __future__ import annotations

import aiohttp

from tests.conftest import ROOT_HEADERS, Org


async def test_list_pipelines_rest(http: aiohttp.ClientSession, acme: Org) -> None:
    async with http.get("/api/v1/pipelines", headers=acme.headers) as r:
        body = await r.json()
        assert r.status == 200, body
    assert [p["pipeline"] for p in body["pipelines"]] == ["monthly_cost", "daily_usage"]


async def test_procedures_sync_rest(http: aiohttp.ClientSession) -> None:
    async with http.post("/api/v1/procedures/sync", headers=ROOT_HEADERS, json={}) as r:
        body = await r.json()
        assert r.status == 200, body
    print(body)
