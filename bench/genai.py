"""`openai.usage` at scale against `dlt` and a floor: `python -m bench genai [ROWS]` (issue #9, Benchmark).

A local OpenAI completions usage API (this module's `UsageAPI`, the documented protocol: Bearer admin key,
`start_time`/`end_time` in Unix seconds, `limit` 1-day buckets per page, `page` = the previous
`next_page`) serves ROWS rows: DAYS x GROUPS (2,000 groups per day; more groups when ROWS would need a
window over 366 days, which the processor refuses). Each page is built when asked for, as a real server
would. Three contenders pull the same pages, each in its own process (so its peak RSS is its own,
the larger of its address space's `VmHWM` and `getrusage` RUSAGE_CHILDREN at its end), one after the other:

- ours: the real `openai.usage` processor with a real `StepContext` built as the engine builds it (the
  process's `OutboundHttp` from `configs/system/providers.yml` with `PROVIDER_BASE_URL_OPENAI` pointing
  at the fake, the real `BigQueryWarehouse` on the emulator, a vault-shaped credential) into
  `openai_usage_daily_raw`. The registry's per-org request rate for OpenAI (60 a minute, a politeness
  limit toward the real API that dlt and the floor do not have) is lifted to its per-process rate for
  the fake, else this would time `sleep` (36 requests at 1M rows: at least 30 s); the figure under the
  production limit is printed beside it. BENCH_GENAI_THROTTLED=1 keeps the limit;
  BENCH_GENAI_PROFILE=FILE writes a cProfile of ours' process;
- dlt: `dlt`'s `rest_api` source (cursor paginator, one yield per page) into DuckDB, parquet loader
  files; the bucket results land in dlt's child table `completions__results`;
- floor: aiohttp + orjson + pyarrow (one Arrow batch per page) -> one DuckDB insert.

Each contender times itself from its first request to its last write (imports and setup excluded) and
reports the rows it wrote; the rows are checked against DAYS x GROUPS. `make bench` runs DEFAULT_ROWS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

FULL_ROWS = 1_000_000
DEFAULT_ROWS = FULL_ROWS  # `make bench` runs the size (about 80 s for the three contenders)
GROUPS = 2_000
MAX_DAYS = 366  # the processor's longest window
END = date(2025, 12, 31)
LIMIT = 7  # buckets per page for every contender (OpenAI's default page size for 1d buckets)
KEY = "sk-admin-bench-" + "0" * 24
CONTENDER_SECONDS = 150.0  # each contender is stopped after this long
CONTENDERS = ("ours", "dlt", "floor")
UNTHROTTLED = os.environ.get("BENCH_GENAI_THROTTLED", "") != "1"  # see `_registry`
GENAI_SECONDS = 170.0  # the whole part in `make bench` (a contender gets what is left, at most the above)
PROJECT = "bench-project"
DATASET = "bench_genai"
MODELS = ("gpt-5.5", "gpt-5-mini", "gpt-4.1", "gpt-4o-mini", "o4-mini")
TIERS = ("default", "flex", "priority", "scale")
METRICS = (
    "input_tokens",
    "input_cached_tokens",
    "input_uncached_tokens",
    "input_text_tokens",
    "input_audio_tokens",
    "input_image_tokens",
    "output_tokens",
    "output_text_tokens",
    "output_audio_tokens",
    "num_model_requests",
)
DIMS = ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier")


def shape(rows: int) -> tuple[int, int]:
    """(days, groups per day) for about `rows` rows within the processor's longest window."""
    groups = GROUPS
    days = max(1, rows // groups)
    if days > MAX_DAYS:
        groups = GROUPS * math.ceil(days / MAX_DAYS)
        days = max(1, rows // groups)
    return days, groups


def _groups(count: int) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        out.append(
            {
                "object": "organization.usage.completions.result",
                "project_id": f"proj_{i % 40:04d}",
                "user_id": f"user_{i % 97:03d}",
                "api_key_id": f"key_{i:05d}",
                "model": MODELS[i % len(MODELS)],
                "batch": i % 3 == 0,
                "service_tier": TIERS[i % len(TIERS)],
            }
        )
    return out


class UsageAPI:
    """The OpenAI completions usage endpoint over DAYS x GROUPS deterministic rows (aiohttp, 127.0.0.1)."""

    def __init__(self, first: date, days: int, groups: int) -> None:
        self.first, self.days = first, days
        self.groups = _groups(groups)
        self.pages = 0
        self.app = web.Application()
        self.app.router.add_get("/v1/organization/usage/completions", self.usage)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _day_bucket(self, index: int) -> dict[str, Any]:
        day = self.first + timedelta(days=index)
        start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
        results = []
        for g, group in enumerate(self.groups):
            base = (g * 7919 + index * 104729) % 90_000 + 100
            cached = base // 3
            results.append(
                {
                    **group,
                    "input_tokens": base * 10,
                    "input_cached_tokens": cached,
                    "input_uncached_tokens": base * 10 - cached,
                    "input_text_tokens": base * 10 - cached,
                    "input_audio_tokens": 0,
                    "input_image_tokens": 0,
                    "output_tokens": base * 2,
                    "output_text_tokens": base * 2,
                    "output_audio_tokens": 0,
                    "num_model_requests": base % 500 + 1,
                }
            )
        return {"object": "bucket", "start_time": start, "end_time": start + 86_400, "results": results}

    async def usage(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response(
                {"error": {"message": "bad key", "type": "invalid_request_error"}}, status=401
            )
        start = int(request.query["start_time"])
        end = int(request.query["end_time"])
        limit = int(request.query.get("limit", "7"))
        first = int(datetime(self.first.year, self.first.month, self.first.day, tzinfo=UTC).timestamp())
        lo = max(0, (start - first) // 86_400)
        hi = min(self.days, (end - first + 86_399) // 86_400)
        index = lo + int(request.query.get("page", "0") or 0)
        chunk = range(index, min(index + limit, hi))
        has_more = index + limit < hi

        def body() -> bytes:
            data = [self._day_bucket(i) for i in chunk]
            page = {"object": "page", "data": data, "has_more": has_more}
            page["next_page"] = str(index + limit - lo) if has_more else None
            return orjson.dumps(page)

        self.pages += 1
        return web.Response(body=await asyncio.to_thread(body), content_type="application/json")

    async def start(self) -> UsageAPI:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# --- the contenders, each run as `python -m bench.genai CONTENDER URL START END FOLDER [EMULATOR]` -------


def _window(start: date, end: date) -> dict[str, Any]:
    first = int(datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp())
    last = int(datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp()) + 86_400
    return {"start_time": first, "end_time": last, "bucket_width": "1d", "limit": LIMIT}


def _registry(path: Path, url: str, folder: Path) -> Any:
    """The production registry, OpenAI pointed at the fake, its per-org request rate lifted to the
    per-process one (UNTHROTTLED; concurrency stays as configured): the production 60 requests a minute
    would make this a measure of `sleep` (see `throttled_seconds`)."""
    import yaml

    from server.providers import ProviderRegistry

    raw = yaml.safe_load(path.read_text())
    limits = raw["providers"]["openai"]["rate_limits"]
    if UNTHROTTLED:
        limits["per_org"]["requests_per_minute"] = limits["per_process"]["requests_per_minute"]
    copy = folder / "providers.yml"
    copy.write_text(yaml.safe_dump(raw))
    return ProviderRegistry.load(copy, {**os.environ, "PROVIDER_BASE_URL_OPENAI": url})


def throttled_seconds(pages: int, requests_per_minute: int = 60) -> float:
    """The least time `pages` requests take under a per-org token bucket of `requests_per_minute`
    (a burst of a tenth of it, as `server.http.client` sizes it)."""
    burst = max(1, requests_per_minute // 10)
    return max(0, pages - burst) * 60 / requests_per_minute


async def ours(url: str, start: date, end: date, folder: Path, emulator: str) -> int:
    """The real processor with a StepContext built as the engine builds it; returns rows written."""
    from processors.base import RunIdentity, StepContext
    from processors.genai import ingest
    from processors.openai.usage import get_engine
    from server.credentials.model import Credential
    from server.http.client import OutboundHttp
    from server.settings import PROJECT_ROOT
    from server.warehouse.bigquery import BigQueryWarehouse, StagedWindow
    from server.warehouse.schema import load_schemas

    registry = _registry(PROJECT_ROOT / "configs" / "system" / "providers.yml", url, folder)
    http = OutboundHttp(registry)
    warehouse = BigQueryWarehouse(project=PROJECT, location="US", endpoint=emulator, job_timeout=3600)
    credential = Credential(
        id="cred_bench",
        org_slug="bench",
        provider="openai",
        name="default",
        version=1,
        fields={"admin_api_key": KEY},
        secret_fields=frozenset({"admin_api_key"}),
    )

    class Secrets:
        async def get(self, provider: str, name: str = "default") -> Credential:
            return credential

    try:
        await warehouse.ensure_tables(DATASET, load_schemas(PROJECT_ROOT / "configs" / "schemas" / "org"))
        context = StepContext(
            run=RunIdentity("benchgenai1", "bench", DATASET, "openai_usage_cost", "openai/cost/usage_cost"),
            step_id="usage",
            attempt=1,
            parameters={},
            steps={},
            warehouse=warehouse,
            meta_dataset="organizations",
            log=logging.LoggerAdapter(logging.getLogger("processors.openai.usage"), {}),
            http=http.bind("bench", "benchgenai1", "usage"),
            secrets=Secrets(),
        )
        config = {
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
            "endpoints": ["completions"],
            "bucket_limit": LIMIT,
        }
        # the warehouse part, timed, nothing changed: the load jobs (they overlap the pull) and the
        # spool's swap (the last file's load job, the count and the MERGE: what is left after the pull)
        timed = {"load": 0.0, "swap": 0.0, "merge": 0.0}

        def timer(key: str, method: Any) -> Any:
            async def run(*args: Any, **kwargs: Any) -> Any:
                begun = time.perf_counter()
                try:
                    return await method(*args, **kwargs)
                finally:
                    timed[key] += time.perf_counter() - begun

            return run

        StagedWindow.load = timer("load", StagedWindow.load)  # type: ignore[method-assign]
        StagedWindow.swap = timer("merge", StagedWindow.swap)  # type: ignore[method-assign]
        ingest.Spool.swap = timer("swap", ingest.Spool.swap)  # type: ignore[method-assign]
        started = _start()
        out = await get_engine().execute(config, context)
        seconds = time.perf_counter() - started
        _report(int(out["rows_written"]), seconds, timed["swap"], timed["load"], timed["merge"])
    finally:
        await http.close()
        await warehouse.close()
    return 0


def dlt_rest_api(url: str, start: date, end: date, folder: Path) -> int:
    """dlt's rest_api source into DuckDB, parquet load files; returns 0 after reporting."""
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    import dlt
    from dlt.sources.rest_api import rest_api_source

    source = rest_api_source(
        {
            "client": {
                "base_url": url,
                "auth": {"type": "bearer", "token": KEY},
                "paginator": {"type": "cursor", "cursor_path": "next_page", "cursor_param": "page"},
            },
            "resources": [
                {
                    "name": "completions",
                    "endpoint": {
                        "path": "v1/organization/usage/completions",
                        "params": {**_window(start, end), "group_by": list(DIMS)},
                        "data_selector": "data",
                    },
                }
            ],
        }
    )
    pipeline = dlt.pipeline(
        pipeline_name="bench_genai",
        destination=dlt.destinations.duckdb(str(folder / "dlt.duckdb")),
        dataset_name="usage",
        pipelines_dir=str(folder / "dlt"),
    )
    started = _start()
    pipeline.run(source, loader_file_format="parquet")
    seconds = time.perf_counter() - started
    with pipeline.sql_client() as client:
        rows = client.execute_sql("SELECT COUNT(*) FROM completions__results")
    _report(int(rows[0][0]) if rows else 0, seconds)
    return 0


async def floor(url: str, start: date, end: date, folder: Path) -> int:
    """aiohttp + orjson + pyarrow (a batch per page) -> one DuckDB insert."""
    import aiohttp
    import duckdb
    import pyarrow as pa

    started = _start()
    batches: list[pa.RecordBatch] = []
    params: dict[str, Any] = {**_window(start, end)}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        while True:
            query = [*params.items(), *(("group_by", d) for d in DIMS)]
            async with session.get(f"{url}/v1/organization/usage/completions", params=query) as response:
                response.raise_for_status()
                page = orjson.loads(await response.read())
            columns: dict[str, list[Any]] = {n: [] for n in ("bucket_start", *DIMS, *METRICS)}
            for bucket in page["data"]:
                for result in bucket["results"]:
                    columns["bucket_start"].append(bucket["start_time"])
                    for name in (*DIMS, *METRICS):
                        columns[name].append(result.get(name))
            batches.append(pa.RecordBatch.from_pydict(columns))
            if not page["has_more"]:
                break
            params["page"] = page["next_page"]
    arrow_usage = pa.Table.from_batches(batches)  # noqa: F841  (DuckDB reads it by name)
    con = duckdb.connect(str(folder / "floor.duckdb"))
    con.execute("CREATE TABLE usage AS SELECT * FROM arrow_usage")
    rows = con.execute("SELECT COUNT(*) FROM usage").fetchone()
    seconds = time.perf_counter() - started
    con.close()
    _report(int(rows[0]) if rows else 0, seconds)
    return 0


_CPU_AT_START = [0.0]


def _cpu() -> float:
    """CPU seconds of this process (all threads) and its waited-for children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _start() -> float:
    """The start of a contender's timing (wall clock; its CPU is counted from here too)."""
    _CPU_AT_START[0] = _cpu()
    return time.perf_counter()


def _high_water_kib() -> int:
    """This process's own peak RSS: `VmHWM` of its address space. (`ru_maxrss` of RUSAGE_SELF survives
    exec: a contender started by a big benchmark process would report that process's size.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _report(
    rows: int,
    seconds: float,
    tail_seconds: float | None = None,
    load_seconds: float | None = None,
    merge_seconds: float | None = None,
) -> None:
    peak = max(_high_water_kib(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    figures = {
        "rows": rows,
        "seconds": seconds,
        "peak_rss_kib": peak,
        "cpu_seconds": _cpu() - _CPU_AT_START[0],
        "tail_seconds": tail_seconds,
        "load_seconds": load_seconds,
        "merge_seconds": merge_seconds,
    }
    print(json.dumps(figures), flush=True)


def _profiled(run: Any) -> int:
    """`run()`, under cProfile when BENCH_GENAI_PROFILE names a file for the stats."""
    target = os.environ.get("BENCH_GENAI_PROFILE")
    if not target:
        return int(run())
    import cProfile

    profiler = cProfile.Profile()
    try:
        return int(profiler.runcall(run))
    finally:
        profiler.dump_stats(target)


def contender_main(argv: list[str]) -> int:
    name, url, start, end, folder = argv[:5]
    first, last, where = date.fromisoformat(start), date.fromisoformat(end), Path(folder)
    if name == "ours":
        try:
            return _profiled(lambda: asyncio.run(ours(url, first, last, where, argv[5])))
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}; detail: {getattr(exc, 'detail', '')}"[:600], file=sys.stderr)
            return 1
    if name == "dlt":
        return dlt_rest_api(url, first, last, where)
    if name == "floor":
        return asyncio.run(floor(url, first, last, where))
    raise SystemExit(f"unknown contender {name}")


# --- the parent -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One contender's figures (rows 0 and an error when it failed)."""

    name: str
    rows: int = 0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    error: str = ""
    tail_seconds: float | None = None  # ours: after the last page (the last load job, the MERGE)
    load_seconds: float | None = None  # ours: all load jobs (overlapping the pull)
    merge_seconds: float | None = None  # ours: the staged count + the MERGE
    pages: int | None = None  # ours: the requests it made
    cpu_seconds: float = 0.0  # the contender's process (dlt's and the floor's DuckDB included)
    server_cpu_seconds: float | None = None  # ours: the emulator's CPU during ours' run
    server_peak_rss_mib: float | None = None  # ours: the emulator's peak RSS (dlt and floor: in-process)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class GenAIResult:
    """The three contenders and the shape of the run."""

    days: int = 0
    groups: int = 0
    outcomes: dict[str, Outcome] = field(default_factory=dict)


async def _contender(name: str, args: list[str], timeout: float) -> Outcome:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.genai",
        name,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return Outcome(name, error=f"stopped after {timeout:.0f} s")
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = err.decode().strip().splitlines()[-3:]
        return Outcome(name, error=f"exit {proc.returncode}: {' | '.join(t[:300] for t in tail)}")
    figures = json.loads(lines[-1])
    return Outcome(
        name,
        figures["rows"],
        figures["seconds"],
        figures["peak_rss_kib"] / 1024,
        "",
        figures["tail_seconds"],
        figures["load_seconds"],
        figures["merge_seconds"],
        cpu_seconds=figures["cpu_seconds"],
    )


def _cpu_of(pid: int) -> float:
    """A live process's CPU seconds (user + system), 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _peak_rss_mib(pid: int) -> float | None:
    """A live process's peak RSS (VmHWM), MiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def measure(
    rows: int, result: GenAIResult, budget: float, only: tuple[str, ...] = CONTENDERS
) -> GenAIResult:
    """Start the fake API and an emulator, run the three contenders one after the other within `budget`."""
    from server.localstack.emulator import Emulator
    from server.localstack.process import free_port

    deadline = time.perf_counter() + budget
    days, groups = shape(rows)
    result.days, result.groups = days, groups
    start = END - timedelta(days=days - 1)
    folder = Path(tempfile.mkdtemp(prefix="bench-genai-"))
    api = await UsageAPI(start, days, groups).start()
    emulator = await asyncio.to_thread(
        lambda: Emulator(
            rest_port=free_port(),
            grpc_port=free_port(),
            project=PROJECT,
            data_dir=None,
            log_path=folder / "emulator.log",
        )
    )
    try:
        common = [api.url, start.isoformat(), END.isoformat(), str(folder)]
        for name, extra in (("ours", [emulator.endpoint]), ("dlt", []), ("floor", [])):
            if name not in only:
                continue
            left = min(CONTENDER_SECONDS, deadline - time.perf_counter())
            if left < 5:
                result.outcomes[name] = Outcome(name, error="skipped (time budget)")
                continue
            served, emulator_cpu = api.pages, _cpu_of(emulator.pid)
            outcome = await _contender(name, [*common, *extra], left)
            if name == "ours":
                outcome.pages = api.pages - served
                outcome.server_cpu_seconds = _cpu_of(emulator.pid) - emulator_cpu
                outcome.server_peak_rss_mib = _peak_rss_mib(emulator.pid)
                if outcome.error:  # what the emulator said about it
                    log = (folder / "emulator.log").read_text(errors="replace").strip().splitlines()
                    outcome.error += " | emulator: " + " | ".join(line[:300] for line in log[-3:])
            result.outcomes[name] = outcome
            print(f"  {_line(outcome, days * groups)}", flush=True)
    finally:
        await asyncio.to_thread(emulator.stop)
        await api.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return result


def _line(o: Outcome, expected: int) -> str:
    if o.error:
        return f"{o.name:<6} failed: {o.error}"
    check = "" if o.rows == expected else f" (expected {expected:,}: ROWS DIFFER)"
    extra = ""
    if o.tail_seconds is not None and o.load_seconds is not None:
        extra += (
            f"; after the last page {o.tail_seconds:.2f} s (last load job + "
            f"MERGE {o.merge_seconds or 0:.2f} s), "
            f"load jobs {o.load_seconds:.2f} s in all (overlapping the pull)"
        )
    if o.server_peak_rss_mib is not None:
        extra += f"; emulator peak RSS {o.server_peak_rss_mib:.0f} MiB, CPU {o.server_cpu_seconds or 0:.1f} s"
    return (
        f"{o.name:<6} {o.rows:>9,} rows in {o.seconds:7.2f} s = {o.rows_per_second:>9,.0f} rows/s, "
        f"peak RSS {o.peak_rss_mib:6.0f} MiB, CPU {o.cpu_seconds:5.1f} s{check}{extra}"
    )


def verdicts(result: GenAIResult) -> list[str]:
    """The ratios against the issue's targets."""
    o = result.outcomes
    ours, dlt, fl = o.get("ours"), o.get("dlt"), o.get("floor")
    if not ours or ours.error:
        return ["ours failed: no ratios"]
    lines = []
    if dlt and not dlt.error and dlt.rows_per_second:
        r = ours.rows_per_second / dlt.rows_per_second
        lines.append(f"ours/dlt rows/s {r:.2f}x (target >= 3x: {'met' if r >= 3 else 'NOT met'})")
        m = ours.peak_rss_mib / dlt.peak_rss_mib
        lines.append(
            f"peak RSS ours {ours.peak_rss_mib:.0f} MiB vs dlt {dlt.peak_rss_mib:.0f} MiB = {m:.2f} "
            f"(target <= 1: {'met' if m <= 1 else 'NOT met'})"
        )
    if fl and not fl.error and fl.rows_per_second:
        r = ours.rows_per_second / fl.rows_per_second
        lines.append(f"ours/floor rows/s {r:.0%} (target >= 40 %: {'met' if r >= 0.4 else 'NOT met'})")
    if ours.pages and UNTHROTTLED:
        lines.append(
            f"ours made {ours.pages} requests; under the registry's production per-org limit for OpenAI "
            f"(60 a minute, a burst of 6) they alone take at least {throttled_seconds(ours.pages):.0f} s"
        )
    return lines


def markdown(result: GenAIResult, host: str) -> str:
    """The README block."""
    expected = result.days * result.groups
    lines = [
        "#### OpenAI usage ingestion (`python -m bench genai [ROWS]`)",
        "",
        f"{expected:,} completions usage rows ({result.days} days x {result.groups:,} groups, {LIMIT} "
        f"buckets per page) from a local fake API, on {host}; each contender in its own process, one "
        "after the other.",
        "",
        "| contender | rows | seconds | rows/s | peak RSS MiB | CPU s (its process) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for o in result.outcomes.values():
        if o.error:
            lines.append(f"| {o.name} | failed: {o.error[:80]} | | | | |")
        else:
            lines.append(
                f"| {o.name} | {o.rows:,} | {o.seconds:.2f} | {o.rows_per_second:,.0f} "
                f"| {o.peak_rss_mib:.0f} | {o.cpu_seconds:.1f} |"
            )
    ours = result.outcomes.get("ours")
    if ours and not ours.error and ours.tail_seconds is not None and ours.load_seconds is not None:
        lines += [
            "",
            f"Of ours' {ours.seconds:.2f} s, {ours.tail_seconds:.2f} s come after the last page (the last "
            f"load job, the count and the MERGE on the emulator); its load jobs took "
            f"{ours.load_seconds:.2f} s in all, mostly while later pages were pulled. Ours' peak RSS is "
            "the processor's process alone "
            "(the emulator, a separate server, peaked at "
            + (f"{ours.server_peak_rss_mib:.0f} MiB" if ours.server_peak_rss_mib else "?")
            + f" and used {ours.server_cpu_seconds or 0:.1f} s of CPU); dlt's and the floor's include their "
            "in-process DuckDB.",
        ]
    lines += ["", *(f"- {v}" for v in verdicts(result))]
    return "\n".join(lines)


async def report(rows: int, budget: float = GENAI_SECONDS, only: tuple[str, ...] = CONTENDERS) -> GenAIResult:
    """Measure and print (the `make bench` part)."""
    days, groups = shape(rows)
    print(
        f"OpenAI usage ingestion: {days * groups:,} rows ({days} days x {groups:,} groups), three contenders:"
    )
    begun = time.perf_counter()
    result = await measure(rows, GenAIResult(), budget, only)
    for line in verdicts(result):
        print(f"  {line}")
    print(f"  (the OpenAI usage part took {time.perf_counter() - begun:.0f} s)")
    return result


async def main(rows: int, host: str, only: tuple[str, ...] = CONTENDERS) -> int:
    """`python -m bench genai [ROWS [CONTENDER ...]]`."""
    result = await report(rows, budget=3 * CONTENDER_SECONDS + 60, only=only)
    print()
    print(markdown(result, host))
    return 0 if all(not o.error for o in result.outcomes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(contender_main(sys.argv[1:]))
