"""Cron schedules in an IANA timezone: DST gaps and repeats, validation, the minimum interval."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from server.scheduler import cron

NY = cron.timezone("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_time_in_the_skipped_hour_runs_once_shifted_by_the_gap() -> None:
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist that day.
    assert cron.between("30 2 * * *", NY, utc(2026, 3, 7), utc(2026, 3, 10)) == [
        utc(2026, 3, 7, 7, 30),
        utc(2026, 3, 8, 7, 30),  # 03:30 EDT
        utc(2026, 3, 9, 6, 30),
    ]


def test_a_time_in_the_repeated_hour_runs_once_at_its_first_occurrence() -> None:
    # 2026-11-01: 02:00 EDT goes back to 01:00 EST; 01:30 happens twice.
    assert cron.between("30 1 * * *", NY, utc(2026, 10, 31), utc(2026, 11, 3)) == [
        utc(2026, 10, 31, 5, 30),
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT only
        utc(2026, 11, 2, 6, 30),
    ]


def test_hourly_across_the_gap_has_no_duplicate_instant() -> None:
    got = cron.between("0 * * * *", NY, utc(2026, 3, 8, 5), utc(2026, 3, 8, 9))
    assert got == sorted(set(got)) == [utc(2026, 3, 8, h) for h in (6, 7, 8, 9)]


def test_latest_and_following() -> None:
    assert cron.latest("30 2 * * *", NY, utc(2026, 3, 1), utc(2026, 3, 9)) == utc(2026, 3, 8, 7, 30)
    assert cron.latest("30 2 * * *", NY, utc(2026, 3, 8, 7, 30), utc(2026, 3, 9)) is None
    assert cron.following("30 2 * * *", NY, utc(2026, 3, 8)) == utc(2026, 3, 8, 7, 30)


@pytest.mark.parametrize(
    "bad", ["", "* * * *", "0 2 * * * *", "61 * * * *", "0 25 * * *", "@daily x", "a b c d e"]
)
def test_bad_cron_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="5-field cron"):
        cron.check_cron(bad)


@pytest.mark.parametrize(
    "bad", ["", "Mars/Olympus", "../etc/passwd", "/etc/localtime", "x" * 100, "EST5EDT,M3"]
)
def test_bad_timezone_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="IANA"):
        cron.timezone(bad)


def test_min_interval() -> None:
    assert cron.min_interval("*/5 * * * *") == 300
    assert cron.min_interval("0 2,3 * * *") == 3600
    assert cron.min_interval("30 2 * * *") == 86400
