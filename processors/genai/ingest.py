"""What the GenAI usage and cost processors share: the run window, the credential, the spool, lineage.

Rows are never held as a list: each page becomes an Arrow batch appended to a temporary Parquet file
(`Spool`, off the event loop); finished files are loaded into a staging table while later pages are
pulled, and one MERGE swaps the window (`Warehouse.staged_window`: all or nothing). Independent page
streams (endpoints, window slices) may run side by side (`concurrently`, `slices`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from processors.base import Credential, StagedWindow, StepContext, Warehouse
from processors.genai.pricing import nano
from server.errors import FieldViolation, InvalidInputError, TerminalError
from server.warehouse.schema import TableSchema, load_schema

SCHEMAS = Path(__file__).resolve().parents[2] / "configs" / "schemas" / "org"


def schema(name: str) -> TableSchema:
    """An org table's schema file."""
    return load_schema(SCHEMAS / f"{name}.json")


class WindowConfig(BaseModel):
    """The window fields every GenAI step takes (templated from the run's dates)."""

    model_config = ConfigDict(extra="forbid")

    start_date: str = Field("", description="First day (UTC, inclusive); empty: the trailing window.")
    end_date: str = Field("", description="Last day (UTC, inclusive); empty: today.")
    trailing_days: int = Field(3, ge=1, le=31, description="Days of the window when no dates are given.")
    credential: str = Field("default", description="Name of the org's provider credential.")


def window(config: WindowConfig, today: date | None = None) -> tuple[date, date]:
    """The inclusive UTC window: the given dates, or the trailing days ending today. No future days."""
    today = today or datetime.now(UTC).date()
    try:
        end = date.fromisoformat(config.end_date) if config.end_date else today
        start = date.fromisoformat(config.start_date) if config.start_date else None
    except ValueError as exc:
        raise InvalidInputError(
            "invalid window", [FieldViolation("start_date", "must be YYYY-MM-DD")], reason="INVALID_WINDOW"
        ) from exc
    start = start or end - timedelta(days=config.trailing_days - 1)
    problems = []
    if end > today:
        problems.append(FieldViolation("end_date", f"{end} is in the future (today is {today})"))
    if start > end:
        problems.append(FieldViolation("start_date", "must not be after end_date"))
    if (end - start).days > 366:
        problems.append(FieldViolation("start_date", "the window is longer than 366 days"))
    if problems:
        raise InvalidInputError("invalid window", problems, reason="INVALID_WINDOW")
    return start, end


async def credential(context: StepContext, provider: str, name: str) -> Credential:
    """The run's org's credential; a missing one fails at once with `CREDENTIAL_MISSING` (no retry)."""
    try:
        return await context.secrets.get(provider, name)
    except TerminalError as exc:
        if exc.reason != "CREDENTIAL_NOT_FOUND":
            raise
        raise TerminalError(
            f"the org has no {provider} credential named {name!r}; add the provider's admin key with "
            f"`pipeline-service credentials set {context.run.org_slug} {provider} --from-file FILE` "
            '(a JSON object {"admin_api_key": "..."})',
            reason="CREDENTIAL_MISSING",
        ) from exc


def lineage(context: StepContext, cred: Credential) -> dict[str, Any]:
    """The lineage columns of every raw row."""
    return {
        "x_pipeline_id": context.run.pipeline_id,
        "x_run_id": context.run.run_id,
        "x_credential_id": cred.id,
        "x_ingested_at": datetime.now(UTC),
    }


def utc_day(value: Any) -> datetime:
    """A bucket bound (Unix seconds or RFC 3339) as an aware UTC datetime."""
    if isinstance(value, int):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    raise TerminalError("a bucket has no start or end time", reason="PROVIDER_BAD_RESPONSE")


def unix(day: date) -> int:
    """UTC midnight of `day` in Unix seconds."""
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def rfc3339(day: date) -> str:
    """UTC midnight of `day` as RFC 3339."""
    return f"{day.isoformat()}T00:00:00Z"


def buckets(page: Any) -> list[dict[str, Any]]:
    """A page's buckets, checked for shape (a malformed page fails the step, it is never skipped)."""
    data = page.get("data") if isinstance(page, dict) else None
    if not isinstance(data, list) or not all(
        isinstance(b, dict) and isinstance(b.get("results"), list) for b in data
    ):
        raise TerminalError("a page has no list of buckets", reason="PROVIDER_BAD_RESPONSE")
    return data


def extra(result: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """The fields of a result this schema does not know (kept in the `extra` JSON column)."""
    unknown = result.keys() - known
    return {k: result[k] for k in unknown} if unknown else {}


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(type(value).__name__)


# --- the spool: pages -> Arrow batches -> Parquet files -> staging table -> one MERGE --------------------

Columns = Mapping[str, "Sequence[Any] | Runs"]
ROWS_PER_FILE = 500_000  # a Parquet file (~20 MB) goes to a load job once it holds this many rows
FILES_AHEAD = 2  # finished files waiting for their load job before the pull waits
_ARROW = {
    "STRING": pa.string(),
    "JSON": pa.string(),  # JSON text, parsed by the MERGE (BigQuery loads no JSON column from Parquet)
    "INT64": pa.int64(),
    "INTEGER": pa.int64(),
    "BOOL": pa.bool_(),
    "BOOLEAN": pa.bool_(),
    "DATE": pa.date32(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "NUMERIC": pa.decimal128(38, 9),
    "FLOAT64": pa.float64(),
}


class Runs:
    """A column given as runs of one value (a bucket's day, the run's lineage, a field no row has):
    converted without a Python object per row."""

    def __init__(self, value: Any = None, count: int = 0) -> None:
        self.runs: list[tuple[Any, int]] = []
        self.count = 0
        self.add(value, count)

    def add(self, value: Any, count: int) -> None:
        """Append `count` rows of `value`."""
        if count:
            self.runs.append((value, count))
            self.count += count

    def __len__(self) -> int:
        return self.count

    def values(self) -> list[Any]:
        """The column as a list (tests, small pages)."""
        return [v for v, n in self.runs for _ in range(n)]


def arrow_schema(schema: TableSchema) -> pa.Schema:
    """The Arrow (and Parquet) schema of a table's staging files: its columns in order, all nullable."""
    return pa.schema([pa.field(str(f["name"]), _ARROW[str(f["type"])]) for f in schema.fields])


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, default=_default).decode()


def _numeric(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise TypeError(type(value).__name__)
    return nano(Decimal(value))


def batch(schema: TableSchema, columns: Columns, count: int) -> pa.RecordBatch:
    """`count` rows given as columns (a missing column is all NULL) as one Arrow batch of the table.

    JSON columns become JSON text, NUMERIC ones exact decimals (more than 9 decimals: rounded half-even
    to 1e-9). A value that does not fit its column, or a NULL in a REQUIRED column, fails the step
    (`ROW_REJECTED`) before anything is loaded.
    """
    arrays = []
    arrow = arrow_schema(schema)
    for field, spec in zip(arrow, schema.fields, strict=True):
        values = columns.get(field.name)
        try:
            convert = {"JSON": _json_text, "NUMERIC": _numeric}.get(spec["type"])
            if values is None:
                array = pa.nulls(count, field.type)
            elif isinstance(values, Runs):
                parts = [
                    pa.repeat(pa.scalar(convert(v) if convert else v, type=field.type), n)
                    for v, n in values.runs
                ]
                array = pa.concat_arrays(parts) if parts else pa.nulls(0, field.type)
            else:
                array = pa.array([convert(v) for v in values] if convert else values, type=field.type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            raise TerminalError(
                f"{schema.name}.{field.name}: a value does not fit {spec['type']}", reason="ROW_REJECTED"
            ) from exc
        if len(array) != count:
            raise TerminalError(f"{schema.name}.{field.name}: {len(array)} values for {count} rows")
        if array.null_count and spec.get("mode") == "REQUIRED":
            raise TerminalError(f"{schema.name}.{field.name} is required but empty", reason="ROW_REJECTED")
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, schema=arrow)


def rows_to_columns(rows: Sequence[Mapping[str, Any]], schema: TableSchema) -> dict[str, list[Any]]:
    """Row dicts as columns (a key a row lacks is NULL; keys the schema does not know are dropped)."""
    return {name: [r.get(name) for r in rows] for name in schema.column_names}


class Spool:
    """A window's rows on their way to the warehouse, page by page, never all in memory.

    `async with Spool(warehouse, dataset, schema) as spool:` opens a staging table; `add` turns a page
    into an Arrow batch (on a worker thread) and appends it to a temporary Parquet file; every
    `rows_per_file` rows the file is closed and loaded into the staging table by a background task while
    later pages are pulled (at most `FILES_AHEAD` finished files wait). `swap` loads the last file and
    replaces the window with one MERGE. Concurrent `add`s are safe. Leaving the block without `swap`
    (an error, a cancellation) drops the staging table: the target keeps its rows.
    """

    def __init__(
        self, warehouse: Warehouse, dataset: str, schema: TableSchema, rows_per_file: int | None = None
    ) -> None:
        self.schema = schema
        self.rows = 0
        self.files = 0
        self.loaded = 0  # files loaded into the staging table so far
        self._staged = warehouse.staged_window(dataset, schema)
        self._stage: StagedWindow | None = None
        self._rows_per_file = rows_per_file or ROWS_PER_FILE
        self._folder: Path | None = None
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._file_rows = 0
        self._lock = asyncio.Lock()
        self._ready: asyncio.Queue[Path | None] = asyncio.Queue(FILES_AHEAD)
        self._loader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Spool:
        self._stage = await self._staged.__aenter__()
        self._folder = Path(tempfile.mkdtemp(prefix="genai-spool-"))
        self._loader = asyncio.create_task(self._load_files())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._loader is not None and not self._loader.done():
                self._loader.cancel()
                with contextlib.suppress(BaseException):
                    await self._loader
            if self._writer is not None:
                await asyncio.to_thread(self._writer.close)
        finally:
            if self._folder is not None:
                await asyncio.to_thread(shutil.rmtree, self._folder, True)
            await self._staged.__aexit__(kind, exc, tb)

    async def add(self, build: Callable[[], Columns | Sequence[Mapping[str, Any]]]) -> int:
        """Build one page's rows (columns, or row dicts) and append them, off the event loop; return
        how many rows the page had."""

        def convert() -> pa.RecordBatch:
            built = build()
            if isinstance(built, Mapping):
                count = len(next(iter(built.values()), ()))
                return batch(self.schema, built, count)
            return batch(self.schema, rows_to_columns(built, self.schema), len(built))

        page = await asyncio.to_thread(convert)
        if not page.num_rows:
            return 0
        async with self._lock:
            await asyncio.to_thread(self._write, page)
            self.rows += page.num_rows
            if self._file_rows >= self._rows_per_file:
                await self._hand_over()
        return int(page.num_rows)

    async def write(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Append rows built already (see `add`)."""
        return await self.add(lambda: rows)

    def _write(self, page: pa.RecordBatch) -> None:
        if self._writer is None:
            assert self._folder is not None, "use the spool in `async with`"
            self._path = self._folder / f"{self.files:05d}.parquet"
            self._writer = pq.ParquetWriter(self._path, page.schema, compression="snappy")
            self.files += 1
        self._writer.write_batch(page)
        self._file_rows += page.num_rows

    async def _hand_over(self) -> None:
        """Close the current file and queue it for its load job (waits while FILES_AHEAD are queued)."""
        writer, path = self._writer, self._path
        if writer is None or path is None:
            return
        self._writer, self._path, self._file_rows = None, None, 0
        await asyncio.to_thread(writer.close)
        await self._put(path)

    async def _put(self, item: Path | None) -> None:
        assert self._loader is not None
        put = asyncio.ensure_future(self._ready.put(item))
        await asyncio.wait({put, self._loader}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():  # the loader stopped: its error is the step's
            put.cancel()
            await self._loader
            raise TerminalError("the spool's loader stopped")  # pragma: no cover (it raised above)

    async def _load_files(self) -> None:
        assert self._stage is not None
        while (path := await self._ready.get()) is not None:
            with path.open("rb") as source:
                await self._stage.load(source)
            self.loaded += 1
            await asyncio.to_thread(path.unlink)

    async def swap(
        self, *, column: str, start: date, end: date, equals: Mapping[str, str] | None = None
    ) -> int:
        """Load what is left, then replace the window with the staged rows; return their count."""
        assert self._stage is not None and self._loader is not None
        async with self._lock:
            await self._hand_over()
            await self._put(None)
            await self._loader
        return await self._stage.swap(column=column, start=start, end=end, equals=equals, expected=self.rows)


async def concurrently(jobs: Sequence[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run the jobs, at most `limit` at a time; the first error cancels the others and is raised."""
    pending = list(jobs)[::-1]

    async def worker() -> None:
        while pending:
            await pending.pop()()

    workers = [asyncio.create_task(worker()) for _ in range(min(limit, len(pending)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def slices(start: date, end: date, days_per_page: int, count: int) -> list[tuple[date, date]]:
    """The window cut into at most `count` consecutive slices of whole pages (inclusive days), so that
    independent page streams can pull it side by side with the same number of requests."""
    days = (end - start).days + 1
    pages = -(-days // days_per_page)
    width = -(-pages // max(1, count)) * days_per_page
    out = []
    first = start
    while first <= end:
        last = min(end, first + timedelta(days=width - 1))
        out.append((first, last))
        first = last + timedelta(days=1)
    return out
