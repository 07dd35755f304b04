"""Run quotas from the org's subscription: runs per UTC day, per UTC month, concurrent; and a per-org
request rate on RunPipeline.

Counters live in this process (seeded from the ledger at start) and are only touched between awaits, so
concurrent calls cannot overshoot. A run counts against the day and month in which it was accepted, so a
run crossing midnight is never counted twice; only the concurrency slot is given back, exactly once,
when the run ends in any state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from server.errors import ThrottledError
from server.orgs import OrgContext
from server.token_bucket import TokenBucket


def _next_day(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)


def _next_month(now: datetime) -> datetime:
    first = date(now.year + (now.month == 12), now.month % 12 + 1, 1)
    return datetime.combine(first, datetime.min.time(), UTC)


@dataclass(eq=False, slots=True)
class Reservation:
    """A concurrency slot held by one run."""

    org_slug: str
    released: bool = False


class Quotas:
    """Per-org counters and token buckets."""

    def __init__(
        self,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._day: dict[tuple[str, date], int] = {}
        self._month: dict[tuple[str, int, int], int] = {}
        self._active: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def seed(self, counts: dict[str, tuple[int, int]], as_of: datetime) -> None:
        """Start from the ledger's counts `{org: (month, day)}` as of `as_of`."""
        for org, (month, day) in counts.items():
            self._month[(org, as_of.year, as_of.month)] = month
            self._day[(org, as_of.date())] = day

    def active(self, org_slug: str) -> int:
        """Runs of the org holding a concurrency slot."""
        return self._active.get(org_slug, 0)

    def used(self, org_slug: str) -> tuple[int, int]:
        """Runs accepted (today, this month) for the org."""
        now = self._clock()
        return self._day.get((org_slug, now.date()), 0), self._month.get((org_slug, now.year, now.month), 0)

    def check_rate(self, org: OrgContext) -> None:
        """Take one token from the org's RunPipeline bucket (capacity = requests per minute)."""
        rate = max(org.requests_per_minute, 1)
        bucket = self._buckets.get(org.org_slug)
        if bucket is None:
            bucket = self._buckets[org.org_slug] = TokenBucket(rate / 60.0, rate, clock=self._monotonic)
        bucket.rate, bucket.capacity = rate / 60.0, rate  # the plan may have changed
        if not bucket.take():
            raise ThrottledError(
                f"more than {rate} RunPipeline calls per minute",
                reason="RATE_LIMITED",
                retry_after=bucket.wait_seconds(),
                metadata={"limit": str(rate)},
            )

    def reserve(self, org: OrgContext) -> Reservation:
        """Count a new run and hold a concurrency slot, or raise ThrottledError naming the limit."""
        now = self._clock()
        day_key, month_key = (org.org_slug, now.date()), (org.org_slug, now.year, now.month)
        if self.active(org.org_slug) >= org.concurrent_limit:
            raise ThrottledError(
                f"{org.concurrent_limit} runs already active",
                reason="CONCURRENT_LIMIT_EXCEEDED",
                retry_after=5.0,
                metadata={"limit": str(org.concurrent_limit)},
            )
        if self._day.get(day_key, 0) >= org.daily_limit:
            raise ThrottledError(
                f"daily limit of {org.daily_limit} runs reached",
                reason="DAILY_LIMIT_EXCEEDED",
                retry_after=(_next_day(now) - now).total_seconds(),
                metadata={"limit": str(org.daily_limit)},
            )
        if self._month.get(month_key, 0) >= org.monthly_limit:
            raise ThrottledError(
                f"monthly limit of {org.monthly_limit} runs reached",
                reason="MONTHLY_LIMIT_EXCEEDED",
                retry_after=(_next_month(now) - now).total_seconds(),
                metadata={"limit": str(org.monthly_limit)},
            )
        self._day[day_key] = self._day.get(day_key, 0) + 1
        self._month[month_key] = self._month.get(month_key, 0) + 1
        self._active[org.org_slug] = self.active(org.org_slug) + 1
        return Reservation(org.org_slug)

    def release(self, reservation: Reservation) -> None:
        """Give the concurrency slot back (idempotent)."""
        if reservation.released:
            return
        reservation.released = True
        self._active[reservation.org_slug] = max(0, self.active(reservation.org_slug) - 1)
