"""Cron schedules in an IANA timezone, evaluated in the zone's wall-clock time.

A schedule's times are the cron's local wall-clock times, each mapped to one UTC instant: a time that
does not exist (the hour skipped when clocks go forward) runs shifted forward by the gap (02:30 becomes
03:30), a time that exists twice (the hour repeated when clocks go back) runs at its first occurrence.
Two wall-clock times that map to the same instant are one time. So a DST transition neither skips nor
doubles a run; scheduled times are compared and stored as UTC instants.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

_MARGIN = timedelta(hours=3)  # larger than any DST shift
_MAX_STEPS = 100_000


def timezone(name: str) -> ZoneInfo:
    """The IANA zone `name`; ValueError if it is not one."""
    if not name or len(name) > 64 or name.startswith(("/", ".")) or ".." in name:
        raise ValueError("not an IANA timezone name (e.g. UTC, Europe/Berlin)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("not an IANA timezone name (e.g. UTC, Europe/Berlin)") from None


def check_cron(expression: str) -> str:
    """`expression` if it is a valid 5-field cron expression, else ValueError."""
    fields = expression.split()
    if len(fields) != 5 or not croniter.is_valid(expression):
        raise ValueError("not a 5-field cron expression (minute hour day-of-month month day-of-week)")
    return " ".join(fields)


def min_interval(expression: str) -> float:
    """The shortest gap in seconds between two consecutive times of the cron over a year of wall-clock
    time (bounded work: at most 2,000 times are looked at)."""
    it = croniter(expression, datetime(2025, 1, 1))
    previous = it.get_next(datetime)
    gap = float("inf")
    for _ in range(2_000):
        current = it.get_next(datetime)
        gap = min(gap, (current - previous).total_seconds())
        previous = current
        if current.year > 2025:
            break
    return gap


def _instant(local: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant of a naive wall-clock time: fold=0 gives the first occurrence of a repeated time
    and, for a skipped time, the offset before the gap (so it lands shifted forward by the gap)."""
    return local.replace(tzinfo=zone, fold=0).astimezone(UTC)


def _local(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def latest(expression: str, zone: ZoneInfo, after: datetime, until: datetime) -> datetime | None:
    """The latest scheduled instant t with after < t <= until (UTC), or None."""
    it = croniter(expression, _local(until, zone) + _MARGIN)
    best: datetime | None = None
    for _ in range(_MAX_STEPS):
        t = _instant(it.get_prev(datetime), zone)
        if after < t <= until and (best is None or t > best):
            best = t
        if t <= after - _MARGIN or (best is not None and t < best - _MARGIN):
            break
    return best


def following(expression: str, zone: ZoneInfo, after: datetime) -> datetime:
    """The first scheduled instant strictly after `after` (UTC)."""
    it = croniter(expression, _local(after, zone) - _MARGIN)
    best: datetime | None = None
    for _ in range(_MAX_STEPS):
        t = _instant(it.get_next(datetime), zone)
        if t > after and (best is None or t < best):
            best = t
        if best is not None and t > best + _MARGIN:
            break
    assert best is not None
    return best


def between(expression: str, zone: ZoneInfo, after: datetime, until: datetime) -> list[datetime]:
    """Every scheduled instant in (after, until], ascending (for tests and the status)."""
    out: list[datetime] = []
    t = after
    while len(out) < _MAX_STEPS:
        t = following(expression, zone, t)
        if t > until:
            break
        out.append(t)
    return out
