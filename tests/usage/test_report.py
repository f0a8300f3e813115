from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from ccproxy.usage.events import HourlyTotals
from ccproxy.usage.report import MAX_BUCKETS, build_report, parse_range

UTC = timezone.utc
NOW = datetime(2024, 5, 20, 15, 42, 7, tzinfo=UTC)


def _row(hour: datetime, requests: int = 1, before: int = 1000, after: int = 400) -> HourlyTotals:
    return HourlyTotals("acct_a", hour, requests, before, after, before - after, after + 10, 20)


def test_totals_savings_percent_and_money() -> None:
    start = datetime(2024, 5, 1, tzinfo=UTC)
    rows = [
        _row(start + timedelta(hours=1), requests=2, before=3000, after=1000),
        _row(start + timedelta(hours=5), requests=1, before=1000, after=1000),
    ]
    report = build_report(rows, start, start + timedelta(days=1), "hour", 2.5)
    totals = report["totals"]
    assert totals["requests"] == 3
    assert totals["tokens_before"] == 4000 and totals["tokens_after"] == 2000
    assert totals["tokens_saved"] == 2000
    assert totals["savings_percent"] == 50.0
    assert totals["money_saved_usd"] == pytest.approx(2000 * 2.5 / 1e6)
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (2020, 40)
    assert report["object"] == "usage" and report["granularity"] == "hour"
    assert (report["from"], report["to"]) == ("2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z")
    assert len(report["series"]) == 24
    assert report["series"][1]["start"] == "2024-05-01T01:00:00Z"
    assert report["series"][1]["savings_percent"] == pytest.approx(66.67)
    assert report["series"][5]["savings_percent"] == 0.0
    assert report["series"][2]["requests"] == 0  # every bucket, zeros included
    assert set(report["series"][0]) == {"start", *totals}


def test_day_buckets_are_utc_days_and_rows_outside_are_ignored() -> None:
    start = datetime(2024, 5, 1, 6, tzinfo=UTC)
    end = datetime(2024, 5, 3, 12, tzinfo=UTC)
    rows = [
        _row(datetime(2024, 5, 1, 6, tzinfo=UTC)),
        _row(datetime(2024, 5, 1, 23, tzinfo=UTC)),
        _row(datetime(2024, 5, 2, 0, tzinfo=UTC)),
        _row(datetime(2024, 5, 3, 11, tzinfo=UTC)),
        _row(datetime(2024, 5, 3, 12, tzinfo=UTC)),  # at `end`: excluded
        _row(datetime(2024, 5, 1, 5, tzinfo=UTC)),  # before `start`: excluded
    ]
    report = build_report(rows, start, end, "day", 1.0)
    assert [(b["start"], b["requests"]) for b in report["series"]] == [
        ("2024-05-01T00:00:00Z", 2),
        ("2024-05-02T00:00:00Z", 1),
        ("2024-05-03T00:00:00Z", 1),
    ]
    assert report["totals"]["requests"] == 4


def test_empty_range_gives_zeros() -> None:
    start = datetime(2024, 5, 1, tzinfo=UTC)
    report = build_report([], start, start + timedelta(days=2), "day", 2.5)
    assert report["totals"] == dict.fromkeys(report["totals"], 0)
    assert len(report["totals"]) == 8
    assert [b["requests"] for b in report["series"]] == [0, 0]


def test_bad_granularity_and_too_many_buckets() -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="granularity"):
        build_report([], start, start + timedelta(days=1), "week", 1.0)  # type: ignore[arg-type]
    too_long = start + timedelta(hours=MAX_BUCKETS + 1)
    with pytest.raises(ValueError, match="granularity=day"):
        build_report([], start, too_long, "hour", 1.0)
    assert len(build_report([], start, too_long, "day", 1.0)["series"]) == 209  # 5001 h


def test_parse_range_defaults_to_the_last_30_days() -> None:
    start, end = parse_range(None, None, NOW)
    assert end == datetime(2024, 5, 20, 16, tzinfo=UTC)  # the current hour is included
    assert start == end - timedelta(days=30)


@pytest.mark.parametrize(
    ("from_str", "to_str", "expected"),
    [
        ("2024-05-01", "2024-05-31", ("2024-05-01T00:00", "2024-06-01T00:00")),  # dates: whole days
        ("2024-05-01T10:30:00Z", "2024-05-01T12:00:00Z", ("2024-05-01T10:00", "2024-05-01T12:00")),
        ("2024-05-01T10:00:00", "2024-05-01T11:00:00.5", ("2024-05-01T10:00", "2024-05-01T12:00")),
        ("2024-05-01T12:00:00+02:00", None, ("2024-05-01T10:00", "2024-05-20T16:00")),
        (None, "2024-05-10", ("2024-04-11T00:00", "2024-05-11T00:00")),
    ],
)
def test_parse_range_accepts_iso_8601(
    from_str: str | None, to_str: str | None, expected: tuple[str, str]
) -> None:
    start, end = parse_range(from_str, to_str, NOW)
    assert (start.tzinfo, end.tzinfo) == (UTC, UTC)
    assert (start.isoformat()[:16], end.isoformat()[:16]) == expected


@pytest.mark.parametrize(
    ("from_str", "to_str", "message"),
    [
        ("yesterday", None, "invalid 'from'"),
        (None, "2024-13-01", "invalid 'to'"),
        ("2024-05-01T25:00", None, "invalid 'from'"),
        ("", None, None),  # empty means unset
        ("2024-05-02", "2024-05-01", "must be before"),
        ("2024-05-01T10:00Z", "2024-05-01T10:00Z", "must be before"),
        ("9999-12-31T23:30", "9999-12-31T23:45", "out of range"),
    ],
)
def test_parse_range_errors(from_str: str | None, to_str: str | None, message: str | None) -> None:
    if message is None:
        assert parse_range(from_str, to_str, NOW) == parse_range(None, None, NOW)
        return
    with pytest.raises(ValueError, match=message):
        parse_range(from_str, to_str, NOW)
