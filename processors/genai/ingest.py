"""What the GenAI usage and cost processors share: the run window, the credential, the row spool, lineage.

Rows are never held as a list: each page's rows are written to a temporary newline-delimited JSON file
(`Spool`, off the event loop) and the file goes to the warehouse in one load job that replaces the window
(`replace_window`: staging table + one MERGE, all or nothing).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import orjson
from pydantic import BaseModel, ConfigDict, Field

from processors.base import Credential, StepContext
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


class Spool:
    """Rows written to a temporary NDJSON file page by page (off the event loop), then loaded once."""

    def __init__(self) -> None:
        self.file: BinaryIO = tempfile.TemporaryFile(prefix="genai-", suffix=".ndjson")  # noqa: SIM115
        self.rows = 0
        self.days: set[date] = set()

    async def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (dates, datetimes and Decimals are written exactly), off the event loop."""
        await self.add(lambda: rows)

    async def add(self, build: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Build a page's rows, serialize and append them, all on a worker thread; return the rows."""

        def run() -> list[dict[str, Any]]:
            rows = build()
            if rows:
                self.file.write(b"".join(orjson.dumps(r, default=_default) + b"\n" for r in rows))
            return rows

        rows = await asyncio.to_thread(run)
        self.rows += len(rows)
        return rows

    def rewind(self) -> BinaryIO:
        """The file, from its start, for the load job."""
        self.file.flush()
        self.file.seek(0)
        return self.file

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.file.close()
