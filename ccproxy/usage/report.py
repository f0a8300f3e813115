"""The body of GET /usage, from hourly totals: pure functions, no database.

Ranges are hour-aligned (the totals' resolution): `from` is floored and `to` ceiled to the
hour, and the response reports the range it covers. The series has every bucket of the range,
zeros included, so a chart needs no gap filling; at most MAX_BUCKETS buckets (about 200 days
hourly), beyond which the request is refused with a hint to use days. Day buckets are UTC days;
the first and last may be partial.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal

from ccproxy.usage.events import TOTAL_FIELDS, HourlyTotals, as_utc

Granularity = Literal["hour", "day"]
DEFAULT_DAYS = 30
MAX_BUCKETS = 5000
BUCKET_STEP: dict[str, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")


def bucket_start(value: datetime, granularity: str) -> datetime:
    value = as_utc(value).replace(minute=0, second=0, microsecond=0)
    return value.replace(hour=0) if granularity == "day" else value


def _ceil_hour(value: datetime) -> datetime:
    floored = bucket_start(value, "hour")
    return floored if floored == value else floored + timedelta(hours=1)


def iso_utc(value: datetime) -> str:
    return as_utc(value).isoformat().replace("+00:00", "Z")


def _parse(text: str, name: str, *, date_is_inclusive_end: bool) -> datetime:
    text = text.strip()
    hint = "an ISO 8601 date or datetime, e.g. 2024-05-01 or 2024-05-01T13:00:00Z"
    try:
        if _DATE_ONLY.fullmatch(text):
            day = date.fromisoformat(text)
            # `to=2024-05-31` means up to the end of that day, as people read it.
            if date_is_inclusive_end:
                day += timedelta(days=1)
            return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        if text[-1:] in ("Z", "z"):  # Python 3.10's fromisoformat does not take Z
            text = text[:-1] + "+00:00"
        value = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        # The value itself is not quoted: error bodies never repeat request content.
        raise ValueError(f"invalid '{name}': expected {hint}") from None
    # Naive means UTC.
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else as_utc(value)


def parse_range(
    from_str: str | None, to_str: str | None, now: datetime
) -> tuple[datetime, datetime]:
    """The hour-aligned UTC range [start, end) of a /usage query; default the last 30 days.

    Naive datetimes are UTC; a bare date as `to` includes that whole day.
    """
    try:
        if to_str:
            end = _ceil_hour(_parse(to_str, "to", date_is_inclusive_end=True))
        else:
            end = _ceil_hour(as_utc(now))
        if from_str:
            start = bucket_start(_parse(from_str, "from", date_is_inclusive_end=False), "hour")
        else:
            start = end - timedelta(days=DEFAULT_DAYS)
    except OverflowError:
        raise ValueError("'from'/'to' out of range") from None
    if start >= end:
        raise ValueError("'from' must be before 'to'")
    return start, end


def usage_window(from_str: str | None, to_str: str | None, granularity: str, now: datetime) -> tuple[datetime, datetime]:
    """``parse_range``, then ``check_buckets``: the range a /usage query (or `ccproxy usage`) reads."""
    window = parse_range(from_str, to_str, now)
    check_buckets(*window, granularity)
    return window


@dataclass(frozen=True)
class BucketGrid:
    """The buckets of [start, end): the first one's start, their granularity and how many."""

    first: datetime
    granularity: str
    count: int

    def index(self, hour: datetime) -> int:
        """The bucket an hour inside the range falls in."""
        return (bucket_start(hour, self.granularity) - self.first) // BUCKET_STEP[self.granularity]

    def start(self, i: int) -> str:
        return iso_utc(self.first + i * BUCKET_STEP[self.granularity])


def bucket_grid(start: datetime, end: datetime, granularity: str) -> BucketGrid:
    """ValueError when [start, end) holds more than MAX_BUCKETS buckets of ``granularity``."""
    first = bucket_start(start, granularity)
    count = math.ceil((as_utc(end) - first) / BUCKET_STEP[granularity])
    if count > MAX_BUCKETS:
        raise ValueError(
            f"the range holds {count} {granularity} buckets, more than {MAX_BUCKETS}: "
            "narrow it or use granularity=day"
        )
    return BucketGrid(first, granularity, count)


def check_buckets(start: datetime, end: datetime, granularity: str) -> None:
    """ValueError when [start, end) holds more than MAX_BUCKETS buckets of ``granularity``:
    checked before the database is asked, and answered with a 400, not left to build_report."""
    if granularity not in BUCKET_STEP:
        raise ValueError("granularity must be 'hour' or 'day'")
    bucket_grid(start, end, granularity)


def savings_percent(tokens_before: int, tokens_saved: int) -> float:
    return round(100.0 * tokens_saved / tokens_before, 2) if tokens_before else 0.0


def _fields(counts: Sequence[int], price_per_million_input_tokens_usd: float) -> dict[str, Any]:
    fields: dict[str, Any] = dict(zip(TOTAL_FIELDS, counts, strict=True))
    fields["savings_percent"] = savings_percent(fields["tokens_before"], fields["tokens_saved"])
    fields["money_saved_usd"] = round(fields["tokens_saved"] * price_per_million_input_tokens_usd / 1e6, 6)
    return fields


def build_report(
    rows: Iterable[HourlyTotals],
    start: datetime,
    end: datetime,
    granularity: Granularity,
    price_per_million_input_tokens_usd: float,
) -> dict[str, Any]:
    """The /usage body for one account's hourly rows; rows outside [start, end) are ignored."""
    if granularity not in BUCKET_STEP:
        raise ValueError(f"invalid granularity {granularity!r}: expected 'hour' or 'day'")
    start, end = as_utc(start), as_utc(end)
    if start >= end:
        raise ValueError(f"start ({iso_utc(start)}) must be before end ({iso_utc(end)})")
    grid = bucket_grid(start, end, granularity)
    buckets = [[0] * len(TOTAL_FIELDS) for _ in range(grid.count)]
    for row in rows:
        hour = as_utc(row.hour)
        if not start <= hour < end:
            continue
        bucket = buckets[grid.index(hour)]
        for i, value in enumerate(row.counts()):
            bucket[i] += value
    totals = [sum(b[i] for b in buckets) for i in range(len(TOTAL_FIELDS))]
    price = price_per_million_input_tokens_usd
    return {
        "object": "usage",
        "from": iso_utc(start),
        "to": iso_utc(end),
        "granularity": granularity,
        "totals": _fields(totals, price),
        "series": [
            {"start": grid.start(i), **_fields(counts, price)}
            for i, counts in enumerate(buckets)
        ],
    }
