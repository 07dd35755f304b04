"""Stored procedures and migrations against the real emulator through the real server: REST via Envoy and
gRPC via the stub.

The tests share one session (one emulator, one central dataset), so each one brings the state it needs
(a sync, its own org dataset, uniquely named scratch procedures) instead of relying on test order.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc import aio

from cloudact.pipeline.v1 import procedure_pb2, procedure_service_pb2, procedure_service_pb2_grpc
from server import app
from server.api.procedures import execution_message
from server.errors import InvalidInputError, NotFoundError
from server.procedures import ProcedureManager
from server.warehouse.schema import load_schema
from tests.conftest import ROOT_HEADERS, ROOT_METADATA, Org, make_org
from tests.integration.rpc_errors import details, error_info, status_of

MIGRATION = "normalize_saas_plan_values"
CENTRAL = "organizations"
PROJECT = "test-project"
ROOT = Path(__file__).resolve().parents[2]
PLANS_SCHEMA = ROOT / "configs" / "schemas" / "org" / "saas_subscription_plans.json"
MIGRATION_FILE = ROOT / "procedures" / "migrations" / f"{MIGRATION}.sql"
Outcome = procedure_pb2.ProcedureSyncResult
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


# --- helpers ------------------------------------------------------------------------------------------


async def call(http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    """One REST call with the root key; (status, JSON body)."""
    async with http.request(method, path, headers=ROOT_HEADERS, **kwargs) as r:
        return r.status, await r.json(content_type=None)


def when(timestamp: str) -> datetime:
    """A proto3 JSON timestamp, parsed: as text `...41.397Z` sorts before `...41Z` (proto3 JSON drops
    a zero fraction), so times are compared parsed, never as strings."""
    return datetime.fromisoformat(timestamp)


def detail(body: dict[str, Any], type_url: str) -> dict[str, Any]:
    """The one detail of a JSON google.rpc.Status with this @type."""
    found = [d for d in body.get("details", []) if d.get("@type") == type_url]
    assert len(found) == 1, body
    return found[0]


def rest_violations(body: dict[str, Any]) -> list[str]:
    """The fields named by the BadRequest detail of a JSON error body."""
    return [v["field"] for v in detail(body, BAD_REQUEST)["field_violations"]]


def assert_rest_error(status: int, body: Any, http_status: int, reason: str) -> None:
    """A JSON google.rpc.Status with the expected HTTP status and ErrorInfo reason."""
    assert status == http_status, body
    info = detail(body, ERROR_INFO)
    assert info["reason"] == reason, body
    assert info["domain"] == "cloudact.io"


def rpc_details(
    exc: aio.AioRpcError,
) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    """ErrorInfo and (if present) BadRequest of a failed call."""
    bad = details(status_of(exc), error_details_pb2.BadRequest)
    return error_info(exc), bad[0] if bad else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_text().encode()).hexdigest()


def write_procedure(
    folder: Path, domain: str, name: str, body: str, *, declared: str | None = None, params: str = ""
) -> Path:
    """A procedure source file `folder/domain/name.sql` in the shipped layout."""
    path = folder / domain / f"{name}.sql"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"CREATE OR REPLACE PROCEDURE `${{project}}.${{dataset}}.{declared or name}`({params})\n"
        f"BEGIN\n  {body}\nEND\n"
    )
    return path


async def sync_state(service: app.Service, name: str) -> list[dict[str, Any]]:
    """The `procedure_sync_state` rows of one procedure."""
    table = service.warehouse.table_ref(CENTRAL, "procedure_sync_state")
    return await service.warehouse.query(
        f"SELECT procedure_name, domain, checksum FROM {table} WHERE procedure_name = @n", {"n": name}
    )


async def routine_names(service: app.Service) -> set[str]:
    return {r.name for r in await service.warehouse.list_routines(CENTRAL)}


async def deploy_shipped(http: aiohttp.ClientSession) -> dict[str, Any]:
    """Make sure the shipped procedures are deployed (a plain sync: creates or leaves unchanged)."""
    status, body = await call(http, "POST", "/api/v1/procedures/sync", json={})
    assert status == 200, body
    assert body["failed"] == 0, body
    return body


async def plans(service: app.Service, dataset: str) -> list[dict[str, Any]]:
    table = service.warehouse.table_ref(dataset, "saas_subscription_plans")
    return await service.warehouse.query(
        "SELECT subscription_id, status, billing_cycle, pricing_model, discount_type, currency, unit_price, "
        f"seats FROM {table} ORDER BY subscription_id"
    )


def plan(
    subscription_id: str,
    *,
    status: str = "active",
    billing_cycle: str = "monthly",
    pricing_model: str = "per_seat",
    currency: str = "USD",
    discount_type: str | None = None,
    unit_price: str = "10.5",
    seats: int | None = 2,
) -> dict[str, Any]:
    return {
        "subscription_id": subscription_id,
        "provider": "slack",
        "plan_name": "pro",
        "status": status,
        "start_date": "2025-01-01",
        "billing_cycle": billing_cycle,
        "pricing_model": pricing_model,
        "unit_price": unit_price,
        "seats": seats,
        "currency": currency,
        "discount_type": discount_type,
    }


async def create_plans(service: app.Service, dataset: str, rows: list[dict[str, Any]]) -> None:
    await service.warehouse.ensure_table(dataset, load_schema(PLANS_SCHEMA))
    assert await service.warehouse.load_rows(dataset, "saas_subscription_plans", rows) == len(rows)


@pytest.fixture
def suffix() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def scratch(service: app.Service, tmp_path: Path, suffix: str) -> AsyncIterator[ProcedureManager]:
    """A second manager over a temporary procedures folder, sharing the central dataset with the server.

    Every routine it creates carries `suffix` in its name and is dropped (with its sync state) afterwards.
    """
    manager = ProcedureManager(
        service.warehouse, CENTRAL, tmp_path / "procedures", org_datasets=service.orgs.active_datasets
    )
    (tmp_path / "procedures").mkdir()
    yield manager
    for name in sorted(await routine_names(service)):
        if name.endswith(suffix):
            await manager.delete(name)
    assert not {n for n in await routine_names(service) if n.endswith(suffix)}


# --- sync ---------------------------------------------------------------------------------------------


async def test_sync_creates_then_leaves_unchanged_then_force_updates_rest(
    http: aiohttp.ClientSession, service: app.Service
) -> None:
    # Start from "not deployed" whatever earlier tests did.
    if MIGRATION in await routine_names(service):
        status, body = await call(http, "DELETE", f"/api/v1/procedures/{MIGRATION}")
        assert status == 200, body
    files = service.procedures.files()
    names = [f.name for f in files]
    assert MIGRATION in names

    status, first = await call(http, "POST", "/api/v1/procedures/sync", json={})
    assert status == 200, first
    assert [r["name"] for r in first["results"]] == names
    outcomes = {r["name"]: r["outcome"] for r in first["results"]}
    assert outcomes[MIGRATION] == "OUTCOME_CREATED"
    assert set(outcomes.values()) <= {"OUTCOME_CREATED", "OUTCOME_UNCHANGED"}
    assert first["created"] >= 1 and first["failed"] == 0 and first["updated"] == 0
    assert first["created"] + first["unchanged"] == len(names)
    result = next(r for r in first["results"] if r["name"] == MIGRATION)
    assert result == {
        "name": MIGRATION,
        "domain": "migrations",
        "outcome": "OUTCOME_CREATED",
        "checksum": sha256(MIGRATION_FILE),
        "error": "",
    }

    status, before = await call(http, "GET", f"/api/v1/procedures/{MIGRATION}")
    assert status == 200, before
    assert before["procedure"]["checksum"] == sha256(MIGRATION_FILE)

    await asyncio.sleep(0.05)
    status, second = await call(http, "POST", "/api/v1/procedures/sync", json={})
    assert status == 200, second
    assert [r["outcome"] for r in second["results"]] == ["OUTCOME_UNCHANGED"] * len(names)
    assert [second[k] for k in ("created", "updated", "unchanged", "failed")] == [0, 0, len(names), 0]
    status, after = await call(http, "GET", f"/api/v1/procedures/{MIGRATION}")
    assert status == 200, after
    # Not re-created: the warehouse's timestamps did not move.
    assert after["procedure"]["update_time"] == before["procedure"]["update_time"]
    assert after["procedure"]["create_time"] == before["procedure"]["create_time"]

    await asyncio.sleep(0.05)
    status, forced = await call(http, "POST", "/api/v1/procedures/sync", json={"force": True})
    assert status == 200, forced
    assert [r["outcome"] for r in forced["results"]] == ["OUTCOME_UPDATED"] * len(names)
    assert [forced[k] for k in ("created", "updated", "unchanged", "failed")] == [0, len(names), 0, 0]
    status, replaced = await call(http, "GET", f"/api/v1/procedures/{MIGRATION}")
    assert status == 200, replaced
    assert when(replaced["procedure"]["update_time"]) > when(before["procedure"]["update_time"])
    assert replaced["procedure"]["checksum"] == sha256(MIGRATION_FILE)
    assert replaced["procedure"]["file_checksum"] == sha256(MIGRATION_FILE)
    assert await sync_state(service, MIGRATION) == [
        {"procedure_name": MIGRATION, "domain": "migrations", "checksum": sha256(MIGRATION_FILE)}
    ]


async def test_sync_grpc(
    procedures: procedure_service_pb2_grpc.ProcedureServiceStub, service: app.Service
) -> None:
    request = procedure_service_pb2.SyncProceduresRequest
    first = await procedures.SyncProcedures(request(), metadata=ROOT_METADATA)
    names = [f.name for f in service.procedures.files()]
    assert [r.name for r in first.results] == names
    assert {r.outcome for r in first.results} <= {Outcome.OUTCOME_CREATED, Outcome.OUTCOME_UNCHANGED}
    assert first.failed == 0

    second = await procedures.SyncProcedures(request(), metadata=ROOT_METADATA)
    assert [r.outcome for r in second.results] == [Outcome.OUTCOME_UNCHANGED] * len(names)
    assert second.unchanged == len(names) and second.created == second.updated == 0

    only = await procedures.SyncProcedures(request(names=[MIGRATION], force=True), metadata=ROOT_METADATA)
    assert [(r.name, r.domain, r.outcome, r.checksum) for r in only.results] == [
        (MIGRATION, "migrations", Outcome.OUTCOME_UPDATED, sha256(MIGRATION_FILE))
    ]
    assert only.updated == 1

    with pytest.raises(aio.AioRpcError) as caught:
        await procedures.SyncProcedures(request(names=["no_such_procedure"]), metadata=ROOT_METADATA)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = rpc_details(caught.value)
    assert info.reason == "PROCEDURE_FILE_NOT_FOUND"
    assert bad is not None and [v.field for v in bad.field_violations] == ["names[0]"]
    assert "no_such_procedure" in bad.field_violations[0].description


async def test_sync_unknown_name_is_a_bad_request(http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "POST", "/api/v1/procedures/sync", json={"names": ["no_such_procedure"]})
    assert_rest_error(status, body, 400, "PROCEDURE_FILE_NOT_FOUND")
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rest_violations(body) == ["names[0]"]

    # Only the unknown entry is named, at its own index.
    status, body = await call(
        http, "POST", "/api/v1/procedures/sync", json={"names": [MIGRATION, "no_such_procedure"]}
    )
    assert_rest_error(status, body, 400, "PROCEDURE_FILE_NOT_FOUND")
    assert rest_violations(body) == ["names[1]"]


async def test_sync_domain_filter(http: aiohttp.ClientSession, service: app.Service) -> None:
    status, body = await call(http, "POST", "/api/v1/procedures/sync", json={"domain": "migrations"})
    assert status == 200, body
    expected = [f.name for f in service.procedures.files() if f.domain == "migrations"]
    assert [r["name"] for r in body["results"]] == expected
    assert MIGRATION in expected
    assert {r["domain"] for r in body["results"]} == {"migrations"}

    status, body = await call(http, "POST", "/api/v1/procedures/sync", json={"domain": "no_such_domain"})
    assert_rest_error(status, body, 400, "PROCEDURE_FILE_NOT_FOUND")
    assert rest_violations(body) == ["domain"]


async def test_sync_outcomes_on_a_temporary_folder(
    scratch: ProcedureManager, suffix: str, service: app.Service, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    folder = tmp_path / "procedures"
    good, broken, mismatch = f"sp_a_{suffix}", f"sp_b_{suffix}", f"sp_c_{suffix}"
    source = write_procedure(folder, "scratch", good, "SELECT 1 AS one;")

    created = await scratch.sync()
    assert [(r.name, r.domain, r.outcome, r.error) for r in created] == [(good, "scratch", "created", "")]
    assert created[0].checksum == sha256(source)
    assert (await service.warehouse.get_routine(CENTRAL, good)).definition.strip() == "SELECT 1 AS one;"
    assert [r["checksum"] for r in await sync_state(service, good)] == [sha256(source)]

    assert [r.outcome for r in await scratch.sync()] == ["unchanged"]

    write_procedure(folder, "scratch", good, "SELECT 2 AS two;")
    updated = await scratch.sync()
    assert [(r.name, r.outcome) for r in updated] == [(good, "updated")]
    assert updated[0].checksum == sha256(source) != created[0].checksum
    assert [r["checksum"] for r in await sync_state(service, good)] == [sha256(source)]

    # The real server sees the routine and the recorded checksum; the file is not part of its build.
    status, body = await call(http, "GET", f"/api/v1/procedures/{good}")
    assert status == 200, body
    assert "SELECT 2 AS two" in body["procedure"]["definition"]
    assert body["procedure"]["checksum"] == sha256(source)
    assert body["procedure"]["file_checksum"] == "" and body["procedure"]["domain"] == ""
    assert body["procedure"]["full_name"] == f"{PROJECT}.{CENTRAL}.{good}"

    broken_path = folder / "scratch" / f"{broken}.sql"
    broken_path.write_text(
        f"CREATE OR REPLACE PROCEDURE `${{project}}.${{dataset}}.{broken}`(p INT64\nBEGIN\n  SELECT 1;\nEND\n"
    )
    write_procedure(folder, "scratch", mismatch, "SELECT 3;", declared=f"sp_other_{suffix}")
    results = {r.name: r for r in await scratch.sync()}
    assert [(n, r.outcome) for n, r in sorted(results.items())] == [
        (good, "unchanged"),
        (broken, "failed"),
        (mismatch, "failed"),
    ]
    assert results[broken].error and results[broken].checksum == sha256(broken_path)
    assert f"{mismatch}.sql must CREATE OR REPLACE PROCEDURE" in results[mismatch].error
    assert results[mismatch].error.endswith(f".{mismatch}")
    deployed = await routine_names(service)
    assert good in deployed
    assert not {broken, mismatch, f"sp_other_{suffix}"} & deployed
    assert await sync_state(service, broken) == [] and await sync_state(service, mismatch) == []

    # Failures are reported, not recorded: they fail again on the next sync.
    again = {r.name: r.outcome for r in await scratch.sync(names=[broken, mismatch])}
    assert again == {broken: "failed", mismatch: "failed"}

    with pytest.raises(InvalidInputError) as caught:
        await scratch.sync(names=[good, "sp_missing"])
    assert [v.field for v in caught.value.violations] == ["names[1]"]


# --- list and get -------------------------------------------------------------------------------------


async def test_list_procedures(http: aiohttp.ClientSession, service: app.Service) -> None:
    await deploy_shipped(http)
    status, body = await call(http, "GET", "/api/v1/procedures")
    assert status == 200, body
    assert set(body) == {"procedures", "next_page_token", "total_size"}
    assert body["next_page_token"] == ""
    assert body["total_size"] == len(body["procedures"])
    names = [p["name"] for p in body["procedures"]]
    assert names == sorted(names)
    migration = next(p for p in body["procedures"] if p["name"] == MIGRATION)
    assert set(migration) == {
        "name",
        "dataset",
        "full_name",
        "domain",
        "checksum",
        "file_checksum",
        "create_time",
        "update_time",
        "definition",
    }
    assert migration["domain"] == "migrations"
    assert migration["dataset"] == CENTRAL
    assert migration["full_name"] == f"{PROJECT}.{CENTRAL}.{MIGRATION}"
    assert migration["checksum"] == migration["file_checksum"] == sha256(MIGRATION_FILE)
    assert migration["definition"] == ""  # only GetProcedure fills it
    assert migration["create_time"].endswith("Z")
    assert when(migration["update_time"]) >= when(migration["create_time"])


async def test_list_procedures_pages(
    http: aiohttp.ClientSession, scratch: ProcedureManager, suffix: str, tmp_path: Path
) -> None:
    await deploy_shipped(http)
    for name in (f"sp_page1_{suffix}", f"sp_page2_{suffix}"):
        write_procedure(tmp_path / "procedures", "scratch", name, "SELECT 1;")
    assert [r.outcome for r in await scratch.sync()] == ["created", "created"]

    status, everything = await call(http, "GET", "/api/v1/procedures", params={"page_size": "1000"})
    assert status == 200, everything
    expected = [p["name"] for p in everything["procedures"]]
    assert len(expected) >= 3

    seen: list[str] = []
    tokens: list[str] = []
    token = ""
    while True:
        params = {"page_size": "1", **({"page_token": token} if token else {})}
        status, page = await call(http, "GET", "/api/v1/procedures", params=params)
        assert status == 200, page
        assert len(page["procedures"]) == 1
        assert page["total_size"] == len(expected)
        seen.append(page["procedures"][0]["name"])
        token = page["next_page_token"]
        if not token:
            break
        tokens.append(token)
        assert len(seen) <= len(expected), "paging does not end"
    assert seen == expected
    assert len(set(tokens)) == len(tokens) == len(expected) - 1
    assert not any(t.startswith("sp_") or t in expected for t in tokens)  # opaque, not the raw name

    status, body = await call(http, "GET", "/api/v1/procedures", params={"page_token": "not-a-token!"})
    assert_rest_error(status, body, 400, "INVALID_PAGE_TOKEN")
    assert rest_violations(body) == ["page_token"]
    status, body = await call(http, "GET", "/api/v1/procedures", params={"page_size": "-1"})
    assert status == 400, body
    assert rest_violations(body) == ["page_size"]


async def test_get_procedure(
    http: aiohttp.ClientSession, procedures: procedure_service_pb2_grpc.ProcedureServiceStub
) -> None:
    await deploy_shipped(http)
    status, body = await call(http, "GET", f"/api/v1/procedures/{MIGRATION}")
    assert status == 200, body
    procedure = body["procedure"]
    assert procedure["name"] == MIGRATION and procedure["domain"] == "migrations"
    assert "plans_to_change" in procedure["definition"]
    assert "${" not in procedure["definition"]

    status, body = await call(http, "GET", "/api/v1/procedures/no_such_procedure")
    assert_rest_error(status, body, 404, "PROCEDURE_NOT_FOUND")
    assert detail(body, ERROR_INFO)["metadata"] == {"name": "no_such_procedure"}

    status, body = await call(http, "GET", "/api/v1/procedures/bad-name")
    assert_rest_error(status, body, 400, "INVALID_IDENTIFIER")
    assert rest_violations(body) == ["name"]

    reply = await procedures.GetProcedure(
        procedure_service_pb2.GetProcedureRequest(name=MIGRATION), metadata=ROOT_METADATA
    )
    assert reply.procedure.definition == procedure["definition"]
    with pytest.raises(aio.AioRpcError) as caught:
        await procedures.GetProcedure(
            procedure_service_pb2.GetProcedureRequest(name="no_such_procedure"), metadata=ROOT_METADATA
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_details(caught.value)[0].reason == "PROCEDURE_NOT_FOUND"


# --- delete -------------------------------------------------------------------------------------------


async def test_delete_procedure(
    http: aiohttp.ClientSession, service: app.Service, scratch: ProcedureManager, suffix: str, tmp_path: Path
) -> None:
    name = f"sp_delete_{suffix}"
    write_procedure(tmp_path / "procedures", "scratch", name, "SELECT 1;")
    assert [r.outcome for r in await scratch.sync()] == ["created"]
    assert len(await sync_state(service, name)) == 1

    status, body = await call(http, "DELETE", f"/api/v1/procedures/{name}")
    assert status == 200, body
    assert body == {"full_name": f"{PROJECT}.{CENTRAL}.{name}"}
    assert name not in await routine_names(service)
    assert await sync_state(service, name) == []

    status, body = await call(http, "GET", f"/api/v1/procedures/{name}")
    assert_rest_error(status, body, 404, "PROCEDURE_NOT_FOUND")
    status, body = await call(http, "DELETE", f"/api/v1/procedures/{name}")
    assert_rest_error(status, body, 404, "PROCEDURE_NOT_FOUND")
    status, body = await call(http, "DELETE", "/api/v1/procedures/bad-name")
    assert_rest_error(status, body, 400, "INVALID_IDENTIFIER")

    # With its checksum forgotten, the next sync creates it again.
    assert [r.outcome for r in await scratch.sync()] == ["created"]


# --- migrations ---------------------------------------------------------------------------------------


async def test_migration_dry_run_apply_and_history(
    http: aiohttp.ClientSession, service: app.Service, acme: Org
) -> None:
    await deploy_shipped(http)
    await create_plans(
        service,
        acme.dataset,
        [
            plan("s1", status="Active ", billing_cycle="MONTHLY", currency="usd"),
            plan("s2"),
            plan(
                "s3",
                status="PENDING",
                billing_cycle=" Annual",
                pricing_model="Flat_Fee",
                currency="eur ",
                discount_type="Percent",
            ),
        ],
    )
    before = await plans(service, acme.dataset)
    url = f"/api/v1/migrations/{MIGRATION}/execute"
    checksum = sha256(MIGRATION_FILE)

    for kwargs in (
        {"params": {"dry_run": "true"}, "json": {"dataset": acme.dataset}},
        {"params": {"dry_run": "true", "dataset": acme.dataset}},
    ):
        status, body = await call(http, "POST", url, **kwargs)
        assert status == 200, body
        assert body["already_applied"] is False
        execution = body["execution"]
        assert {k: execution[k] for k in ("name", "dataset", "checksum", "dry_run", "executed_by")} == {
            "name": MIGRATION,
            "dataset": acme.dataset,
            "checksum": checksum,
            "dry_run": True,
            "executed_by": "root",
        }
        assert execution["rows"] == [{"dataset": acme.dataset, "dry_run": True, "plans_to_change": 2}]
        # A small INT64 is a JSON number (json_value keeps ints below 2**53 as numbers).
        assert type(execution["rows"][0]["plans_to_change"]) is int
        assert await plans(service, acme.dataset) == before

    status, applied = await call(http, "POST", url, json={"dataset": acme.dataset})
    assert status == 200, applied
    assert applied["already_applied"] is False
    assert applied["execution"]["dry_run"] is False
    assert applied["execution"]["rows"] == [{"dataset": acme.dataset, "dry_run": False, "plans_to_change": 2}]
    after = await plans(service, acme.dataset)
    assert [
        (
            p["subscription_id"],
            p["status"],
            p["billing_cycle"],
            p["pricing_model"],
            p["currency"],
            p["discount_type"],
        )
        for p in after
    ] == [
        ("s1", "active", "monthly", "per_seat", "USD", None),
        ("s2", "active", "monthly", "per_seat", "USD", None),
        ("s3", "pending", "annual", "flat_fee", "EUR", "percent"),
    ]
    assert [(p["unit_price"], p["seats"]) for p in after] == [(Decimal("10.5"), 2)] * 3

    history = await service.procedures.history(MIGRATION, acme.dataset)
    assert [h.dry_run for h in history] == [True, True, False]
    assert {(h.checksum, h.executed_by, h.name, h.dataset) for h in history} == {
        (checksum, "root", MIGRATION, acme.dataset)
    }
    assert history[-1].rows == [{"dataset": acme.dataset, "dry_run": False, "plans_to_change": 2}]

    # Applied already: nothing runs, so a plan added since stays as it is, and nothing is recorded.
    await service.warehouse.load_rows(acme.dataset, "saas_subscription_plans", [plan("s4", status="EXPIRED")])
    status, again = await call(http, "POST", url, json={"dataset": acme.dataset})
    assert status == 200, again
    assert again["already_applied"] is True
    assert again["execution"] == applied["execution"]
    statuses = [p["status"] for p in await plans(service, acme.dataset)]
    assert statuses == ["active", "active", "pending", "EXPIRED"]
    assert len(await service.procedures.history(MIGRATION, acme.dataset)) == len(history)

    status, forced = await call(http, "POST", url, json={"dataset": acme.dataset, "force": True})
    assert status == 200, forced
    assert forced["already_applied"] is False
    assert forced["execution"]["rows"] == [{"dataset": acme.dataset, "dry_run": False, "plans_to_change": 1}]
    assert when(forced["execution"]["execute_time"]) > when(applied["execution"]["execute_time"])
    statuses = [p["status"] for p in await plans(service, acme.dataset)]
    assert statuses == ["active", "active", "pending", "expired"]
    history = await service.procedures.history(MIGRATION, acme.dataset)
    assert [h.dry_run for h in history] == [True, True, False, False]


async def test_migration_errors(http: aiohttp.ClientSession, acme: Org) -> None:
    await deploy_shipped(http)
    url = f"/api/v1/migrations/{MIGRATION}/execute"

    # The central dataset is never a target: refused at once, nothing is tried (or retried).
    began = asyncio.get_running_loop().time()
    status, body = await call(http, "POST", url, params={"dry_run": "true", "dataset": CENTRAL})
    assert_rest_error(status, body, 400, "DATASET_NOT_ALLOWED")
    assert rest_violations(body) == ["dataset"]
    assert asyncio.get_running_loop().time() - began < 5
    status, body = await call(http, "POST", url, params={"dry_run": "true"}, json={"dataset": "bad-dataset"})
    assert status == 400, body
    assert rest_violations(body) == ["dataset"]

    status, body = await call(
        http,
        "POST",
        "/api/v1/migrations/no_such_migration/execute",
        params={"dry_run": "true"},
        json={"dataset": acme.dataset},
    )
    assert_rest_error(status, body, 404, "MIGRATION_NOT_FOUND")
    assert detail(body, ERROR_INFO)["metadata"] == {"name": "no_such_migration"}

    missing = f"no_such_dataset_{uuid.uuid4().hex[:8]}"
    status, body = await call(http, "POST", url, params={"dry_run": "true"}, json={"dataset": missing})
    assert_rest_error(status, body, 404, "DATASET_NOT_FOUND")
    assert detail(body, ERROR_INFO)["metadata"] == {"dataset": missing}


async def test_migration_for_every_active_org_dataset(
    http: aiohttp.ClientSession, service: app.Service
) -> None:
    """The seed's call verbatim: root key, `dry_run=true`, no body. It runs the migration once for every
    active org's dataset and records one history row per dataset."""
    first, second = await make_org(service, "mig_all"), await make_org(service, "mig_all")
    await create_plans(service, first.dataset, [plan("p1", currency="eur")])
    await deploy_shipped(http)
    datasets = sorted(await service.orgs.active_datasets())
    assert {first.dataset, second.dataset} <= set(datasets)

    async with http.post(f"/api/v1/migrations/{MIGRATION}/execute?dry_run=true", headers=ROOT_HEADERS) as r:
        body = await r.json()
        assert r.status == 200, body
    assert [result["dataset"] for result in body["results"]] == datasets
    assert (body["executed"], body["skipped"], body["failed"]) == (len(datasets), 0, 0)
    assert body["already_applied"] is False and "execution" not in body
    by_dataset = {result["dataset"]: result for result in body["results"]}
    assert by_dataset[first.dataset]["execution"]["rows"] == [
        {"dataset": first.dataset, "dry_run": True, "plans_to_change": 1}
    ]
    assert by_dataset[second.dataset]["execution"]["rows"] == [
        {"dataset": second.dataset, "dry_run": True, "plans_to_change": 0}
    ]
    assert all(r["error"] == "" and r["error_reason"] == "" for r in body["results"])
    for org in (first, second):
        history = await service.procedures.history(MIGRATION, org.dataset)
        assert [(h.dry_run, h.dataset) for h in history] == [(True, org.dataset)]
    # A dry run changed nothing.
    assert [p["currency"] for p in await plans(service, first.dataset)] == ["eur"]


async def test_migration_grpc(
    procedures: procedure_service_pb2_grpc.ProcedureServiceStub, service: app.Service
) -> None:
    org = await make_org(service, "initech")
    await procedures.SyncProcedures(
        procedure_service_pb2.SyncProceduresRequest(names=[MIGRATION]), metadata=ROOT_METADATA
    )
    await create_plans(service, org.dataset, [plan("p1", currency="gbp"), plan("p2")])
    request = procedure_service_pb2.ExecuteMigrationRequest

    dry = await procedures.ExecuteMigration(
        request(name=MIGRATION, dataset=org.dataset, dry_run=True), metadata=ROOT_METADATA
    )
    assert not dry.already_applied and dry.execution.dry_run
    assert dry.execution.executed_by == "root" and dry.execution.checksum == sha256(MIGRATION_FILE)
    assert json_format.MessageToDict(dry.execution.rows[0]) == {
        "dataset": org.dataset,
        "dry_run": True,
        "plans_to_change": 1,
    }
    assert [p["currency"] for p in await plans(service, org.dataset)] == ["gbp", "USD"]

    applied = await procedures.ExecuteMigration(
        request(name=MIGRATION, dataset=org.dataset), metadata=ROOT_METADATA
    )
    assert not applied.already_applied and not applied.execution.dry_run
    assert [p["currency"] for p in await plans(service, org.dataset)] == ["GBP", "USD"]

    again = await procedures.ExecuteMigration(
        request(name=MIGRATION, dataset=org.dataset), metadata=ROOT_METADATA
    )
    assert again.already_applied
    assert again.execution == applied.execution
    assert [h.dry_run for h in await service.procedures.history(MIGRATION, org.dataset)] == [True, False]

    with pytest.raises(aio.AioRpcError) as caught:
        await procedures.ExecuteMigration(
            request(name=MIGRATION, dataset=CENTRAL, dry_run=True), metadata=ROOT_METADATA
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = rpc_details(caught.value)
    assert info.reason == "DATASET_NOT_ALLOWED"
    assert bad is not None and [v.field for v in bad.field_violations] == ["dataset"]

    with pytest.raises(aio.AioRpcError) as caught:
        await procedures.ExecuteMigration(
            request(name="no_such_migration", dataset=org.dataset, dry_run=True), metadata=ROOT_METADATA
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_details(caught.value)[0].reason == "MIGRATION_NOT_FOUND"


async def test_migration_result_values_and_new_versions(
    scratch: ProcedureManager, suffix: str, service: app.Service, globex: Org, tmp_path: Path
) -> None:
    name = f"mig_values_{suffix}"
    folder = tmp_path / "procedures"

    def version(n: int) -> str:
        """Write version `n` of the migration; return its checksum."""
        return sha256(
            write_procedure(
                folder,
                "migrations",
                name,
                f"SELECT p_dataset AS dataset, p_dry_run AS dry_run, {n} AS version, "
                "9007199254740993 AS big, NUMERIC '1.5' AS amount, DATE '2025-01-02' AS day;",
                params="p_dataset STRING, p_dry_run BOOL",
            )
        )

    first = version(1)
    with pytest.raises(NotFoundError) as caught:
        await scratch.execute_migration(name, globex.dataset, dry_run=True, force=False, executed_by="test")
    assert caught.value.reason == "MIGRATION_NOT_DEPLOYED"
    assert [r.outcome for r in await scratch.sync()] == ["created"]

    [outcome] = await scratch.execute_migration(
        name, globex.dataset, dry_run=False, force=False, executed_by="test"
    )
    run = outcome.run
    assert run is not None and not outcome.already_applied
    assert run.checksum == first
    # Beyond 2**53 an INT64 becomes a string; exact decimals and dates are strings too.
    assert run.rows == [
        {
            "dataset": globex.dataset,
            "dry_run": False,
            "version": 1,
            "big": "9007199254740993",
            "amount": run.rows[0]["amount"],
            "day": "2025-01-02",
        }
    ]
    assert Decimal(run.rows[0]["amount"]) == Decimal("1.5") and isinstance(run.rows[0]["amount"], str)
    message = json_format.MessageToDict(execution_message(run), preserving_proto_field_name=True)
    assert message["rows"][0]["big"] == "9007199254740993"
    assert message["rows"][0]["version"] == 1
    assert message["executed_by"] == "test"

    [again] = await scratch.execute_migration(
        name, globex.dataset, dry_run=False, force=False, executed_by="test"
    )
    assert again.already_applied and again.run == run

    # A changed migration (new checksum) is a new migration: it applies without force.
    second = version(2)
    assert [r.outcome for r in await scratch.sync()] == ["updated"]
    [outcome2] = await scratch.execute_migration(
        name, globex.dataset, dry_run=False, force=False, executed_by="test"
    )
    run2 = outcome2.run
    assert run2 is not None and not outcome2.already_applied
    assert run2.checksum == second != first
    assert run2.rows[0]["version"] == 2
    history = await scratch.history(name, globex.dataset)
    assert [(h.dry_run, h.checksum, h.rows[0]["version"]) for h in history] == [
        (False, first, 1),
        (False, second, 2),
    ]
    assert isinstance(history[0].executed_at.date(), date)

    # A procedure outside `migrations/` is not a migration.
    write_procedure(
        folder, "scratch", f"sp_plain_{suffix}", "SELECT 1;", params="p_dataset STRING, p_dry_run BOOL"
    )
    await scratch.sync()
    with pytest.raises(NotFoundError) as caught:
        await scratch.execute_migration(
            f"sp_plain_{suffix}", globex.dataset, dry_run=True, force=False, executed_by="test"
        )
    assert caught.value.reason == "MIGRATION_NOT_FOUND"
