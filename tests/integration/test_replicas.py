"""Two replicas: two `pipeline-service serve` processes on the session's PostgreSQL and emulator, behind
one Envoy with both as upstream endpoints (round robin). Limits, idempotency and crash recovery hold
across them: 20 simultaneous RunPipeline calls for an org allowed 3 concurrent runs are 3 accepted runs
and 17 429s; one request id sent to both is one run; a replica killed with SIGKILL has its runs closed as
INTERRUPTED by the other only after its lease expired, and the other's runs go on; a run acknowledged
right before a crash is found after the restart.

The session's in-process service is a third replica on the same database (it may be the one that closes
a dead replica's runs: any live replica may).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
from grpc import aio
from pydantic import SecretStr

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from server.localstack.emulator import Emulator
from server.localstack.envoy import Envoy
from server.localstack.postgres import Postgres
from server.orgs import Plan
from server.settings import Settings
from server.state.store import StateStore
from tests.conftest import Org, make_org, scratch_database
from tests.integration.runs import cancel_and_wait, get, wait_state, wait_terminal
from tests.integration.servers import ServerProcess, eventually, server_env

PS = pipeline_service_pb2
RS = pipeline_run_pb2
Stub = pipeline_service_pb2_grpc.PipelineServiceStub
LEASE = 2.0


class Replica:
    """A serve process with its channel and stub."""

    def __init__(self, server: ServerProcess, channel: aio.Channel) -> None:
        self.server, self.channel, self.stub = server, channel, Stub(channel)


@contextlib.asynccontextmanager
async def replica(env: dict[str, str], log: Path) -> AsyncIterator[Replica]:
    server = ServerProcess(env, log)
    try:
        await server.start()
        async with aio.insecure_channel(server.address) as channel:
            await server.wait_serving(channel)
            yield Replica(server, channel)
    except BaseException:
        print(f"--- {log.name}, last lines ---\n{server.tail()}")
        raise
    finally:
        await server.stop()


def upstream_requests(envoy: Envoy) -> dict[str, int]:
    """Requests Envoy sent to each upstream endpoint (its admin `/clusters`)."""
    with urllib.request.urlopen(f"{envoy.admin_url}/clusters?format=json", timeout=5) as response:
        clusters = json.loads(response.read())["cluster_statuses"]
    counts: dict[str, int] = {}
    for host in clusters[0]["host_statuses"]:
        address = host["address"]["socket_address"]
        stats = {s["name"]: int(s.get("value", 0)) for s in host["stats"]}
        counts[f"{address['address']}:{address['port_value']}"] = stats.get("rq_total", 0)
    return counts


async def owner_pid(service: app.Service, run_id: str) -> tuple[int, datetime]:
    """The pid of the replica owning a run, and when its lease expires."""
    async with service.state.connection() as conn:
        row = await conn.fetchrow(
            "SELECT p.pid, p.expires_at FROM runs r JOIN replicas p ON p.replica_id = r.owner "
            "WHERE r.run_id = $1",
            run_id,
        )
    assert row is not None, run_id
    return int(row["pid"]), row["expires_at"]


def sleepy(org: Org, seconds: str, **fields: str) -> PS.RunPipelineRequest:
    return PS.RunPipelineRequest(
        org_slug=org.slug,
        provider="engine",
        domain="runs",
        pipeline="sleepy",
        parameters={"sleep": seconds},
        **fields,
    )


@pytest.mark.timeout(300)
async def test_two_replicas_behind_one_envoy(
    service: app.Service, settings: Settings, emulator: Emulator, tmp_path: Path
) -> None:
    env = server_env(settings, emulator, REPLICA_LEASE_SECONDS=str(LEASE))
    limited = await make_org(
        service,
        "replicas",
        plan=Plan(concurrent_limit=3, daily_limit=1000, monthly_limit=1000, requests_per_minute=1000),
    )
    async with contextlib.AsyncExitStack() as stack:
        one = await stack.enter_async_context(replica(env, tmp_path / "replica-1.log"))
        two = await stack.enter_async_context(replica(env, tmp_path / "replica-2.log"))
        envoy = Envoy(grpc_port=[one.server.port, two.server.port], work_dir=tmp_path / "envoy")
        stack.callback(envoy.stop)
        http = await stack.enter_async_context(aiohttp.ClientSession(base_url=envoy.rest_url))

        # 1. 20 simultaneous calls through Envoy, spread over both replicas: exactly 3 accepted.
        before = upstream_requests(envoy)

        async def post(i: int) -> tuple[int, dict[str, object]]:
            async with http.post(
                f"/api/v1/pipelines/run/{limited.slug}/engine/runs/sleepy",
                headers=limited.headers,
                json={"parameters": {"sleep": str(30 + i)}},
            ) as r:
                return r.status, await r.json()

        answers = await asyncio.gather(*(post(i) for i in range(20)))
        assert Counter(status for status, _ in answers) == {200: 3, 429: 17}, answers
        for status, body in answers:
            if status == 429:
                kinds = {d["@type"].rsplit(".", 1)[-1]: d for d in body["details"]}  # type: ignore[union-attr]
                assert kinds["ErrorInfo"]["reason"] == "CONCURRENT_LIMIT_EXCEEDED", body
                assert float(kinds["RetryInfo"]["retry_delay"].rstrip("s")) > 0, body
        sent = {k: v - before.get(k, 0) for k, v in upstream_requests(envoy).items()}
        assert len(sent) == 2 and all(n > 0 for n in sent.values()), sent  # both replicas were called
        accepted = [str(body["run"]["run_id"]) for status, body in answers if status == 200]  # type: ignore[index]
        assert await service.state.active_runs(limited.slug) == 3
        await cancel_and_wait(one.stub, limited, accepted)  # a run of the other replica: cancelled by it
        assert await service.state.active_runs(limited.slug) == 0

        # 2. One request id sent to both replicas at once: one run.
        org = await make_org(service, "replicas_idem")
        request_id = str(uuid.uuid4())
        runs = await asyncio.gather(
            *(
                stub.RunPipeline(sleepy(org, "0.5", request_id=request_id), metadata=org.metadata, timeout=30)
                for stub in (one.stub, two.stub) * 4
            )
        )
        assert len({r.run.run_id for r in runs}) == 1, runs
        assert (await wait_terminal(two.stub, org, runs[0].run.run_id)).state == RS.RUN_STATE_COMPLETED
        assert (await service.state.used(org.slug))[0] == 1

        # 3. SIGKILL a replica mid-run: its run ends INTERRUPTED after its lease expired, the other's go on.
        victim_run = (await one.stub.RunPipeline(sleepy(org, "30"), metadata=org.metadata, timeout=30)).run
        other_run = (await two.stub.RunPipeline(sleepy(org, "3"), metadata=org.metadata, timeout=30)).run
        await wait_state(one.stub, org, victim_run.run_id, RS.RUN_STATE_RUNNING)
        await wait_state(two.stub, org, other_run.run_id, RS.RUN_STATE_RUNNING)
        pid, expires = await owner_pid(service, victim_run.run_id)
        assert pid == one.server.pid
        assert await one.server.kill() == -signal.SIGKILL
        seen = await get(two.stub, org, victim_run.run_id)
        assert seen.state == RS.RUN_STATE_RUNNING  # not closed while the lease may still hold

        async def interrupted() -> RS.PipelineRun | None:
            run = await get(two.stub, org, victim_run.run_id)
            return run if run.state == RS.RUN_STATE_FAILED else None

        closed = await eventually("the killed replica's run is closed", interrupted, within=LEASE * 5)
        assert closed.reason == "INTERRUPTED", closed
        assert closed.end_time.ToDatetime().timestamp() >= expires.timestamp()
        assert {s.step_id: s.state for s in closed.steps} == {
            "nap": RS.STEP_STATE_NOT_RUN,
            "after": RS.STEP_STATE_NOT_RUN,
        }
        done = await wait_terminal(two.stub, org, other_run.run_id, timeout=20)
        assert done.state == RS.RUN_STATE_COMPLETED and done.reason == "", done
        events = await service.state.events(victim_run.run_id)
        assert [e["to_state"] for e in events if e["kind"] == "RUN_TRANSITION"] == [
            "PENDING",
            "RUNNING",
            "FAILED",
        ]

        # 4. A run acknowledged right before a crash is there after the restart, and closed once.
        acknowledged = (await two.stub.RunPipeline(sleepy(org, "30"), metadata=org.metadata, timeout=30)).run
        assert await two.server.kill() == -signal.SIGKILL
        async with replica(env, tmp_path / "replica-2b.log") as restarted:
            found = await get(restarted.stub, org, acknowledged.run_id)
            assert found.run_id == acknowledged.run_id and found.parameters["sleep"] == "30"

            async def closed_once() -> RS.PipelineRun | None:
                run = await get(restarted.stub, org, acknowledged.run_id)
                return run if run.state == RS.RUN_STATE_FAILED else None

            final = await eventually("the acknowledged run is closed", closed_once, within=LEASE * 5)
            assert final.reason == "INTERRUPTED"
            transitions = [
                e["to_state"]
                for e in await service.state.events(acknowledged.run_id)
                if e["kind"] == "RUN_TRANSITION"
            ]
            assert transitions[0] == "PENDING" and transitions[-1] == "FAILED"
            assert transitions.count("FAILED") == 1
            # The restarted replica runs new work.
            fresh = (
                await restarted.stub.RunPipeline(sleepy(org, "0.1"), metadata=org.metadata, timeout=30)
            ).run
            assert (await wait_terminal(restarted.stub, org, fresh.run_id)).state == RS.RUN_STATE_COMPLETED


async def test_a_replica_that_lost_its_lease_stops_its_runs_and_takes_a_new_one(
    settings: Settings, postgres: Postgres
) -> None:
    """A replica paused longer than its lease (here: its lease expired by hand) finds its runs closed by
    another replica: it stops them without writing anything more, takes a new lease and goes on."""
    async with scratch_database(postgres, "zombie") as url:
        svc = await app.start(
            settings.model_copy(update={"database_url": SecretStr(url), "replica_lease_seconds": 1.0})
        )
        try:
            org = await make_org(svc, "zombie")
            async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
                stub = Stub(channel)
                run = (await stub.RunPipeline(sleepy(org, "30"), metadata=org.metadata, timeout=30)).run
                await wait_state(stub, org, run.run_id, RS.RUN_STATE_RUNNING)
                old_lease = svc.state.replica_id
                other = await StateStore.connect(dsn=url, upgrade=False)

                async def expire_and_sweep() -> str:
                    # The lease runs out while the replica cannot renew, and another replica sweeps. (The
                    # replica's own sweep may come first, between its renewal and ours: then it closed its
                    # run itself, which is as right; the events below show the run was closed once.)
                    async with other.connection() as conn:
                        await conn.execute(
                            "UPDATE replicas SET expires_at = '-infinity' WHERE replica_id = $1", old_lease
                        )
                    await other.sweep()
                    stored = await other.get_run(org.slug, run.run_id)
                    return stored.reason if stored is not None and stored.terminal else ""

                try:
                    closed = await eventually("the run is closed", expire_and_sweep, within=5, interval=0.01)
                    assert closed == "INTERRUPTED"
                finally:
                    await other.close()
                ended = await wait_terminal(stub, org, run.run_id, timeout=10)
                assert (ended.state, ended.reason) == (RS.RUN_STATE_FAILED, "INTERRUPTED"), ended
                transitions = [
                    e["to_state"] for e in await svc.state.events(run.run_id) if e["kind"] == "RUN_TRANSITION"
                ]
                assert transitions == ["PENDING", "RUNNING", "FAILED"]  # the stopped run wrote nothing more

                async def new_lease() -> bool:
                    return svc.state.replica_id != old_lease

                await eventually("a new lease", new_lease, within=5)
                fresh = (await stub.RunPipeline(sleepy(org, "0.1"), metadata=org.metadata, timeout=30)).run
                assert (await wait_terminal(stub, org, fresh.run_id)).state == RS.RUN_STATE_COMPLETED
        finally:
            await svc.stop()
