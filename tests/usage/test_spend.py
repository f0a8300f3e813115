"""The Gateway's spending checks (ccproxy/spend.py): the model allow-list and the monthly spend
cap per key, its policy pure, its spend read from real SQLite and PostgreSQL stores."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from ccproxy.pricing import parse_table
from ccproxy.protocol import ProxyError
from ccproxy.spend import (
    SpendGuard,
    check_model_allowed,
    key_spend,
    model_allowed,
    month_bounds,
    over_cap,
)
from ccproxy.usage.store import StoreUnavailable
from tests.usage.conftest import Backend
from tests.usage.helpers import make_event

PRICES = parse_table(
    """{"default": {"input": "10", "output": "30"},
        "compress": {"input": "1"},
        "models": {"gpt-4o": {"input": "2.50", "cached_input": "1.25", "output": "10"}}}"""
)
MAY = datetime(2024, 5, 20, 12, 30, tzinfo=timezone.utc)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now
        self.ticks = 0.0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.ticks


# --- pure policy -------------------------------------------------------------------------------
def test_the_allow_list_takes_exact_names_and_star_prefixes() -> None:
    allowed = ["gpt-4o-mini", "llama3*"]
    assert model_allowed("gpt-4o-mini", allowed)
    assert model_allowed("llama3:70b", allowed)
    assert not model_allowed("gpt-4o", allowed)
    assert not model_allowed("gpt-4o-mini-2024-07-18", allowed)  # exact means exact
    assert model_allowed("anything", None)
    assert not model_allowed("anything", [])


def test_a_model_outside_the_list_is_a_403_in_the_openai_shape_without_the_name() -> None:
    check_model_allowed("gpt-4o-mini", ["gpt-4o-mini"])
    with pytest.raises(ProxyError) as caught:
        check_model_allowed("o1-pro\u0000" + "x" * 10_000, ["gpt-4o-mini"])
    error = caught.value
    assert (error.status, error.code, error.param) == (403, "model_not_allowed", "model")
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "o1-pro" not in body["message"] and len(body["message"]) < 300


def test_month_bounds_and_the_cap_rule() -> None:
    assert month_bounds(MAY) == (
        datetime(2024, 5, 1, tzinfo=timezone.utc),
        datetime(2024, 6, 1, tzinfo=timezone.utc),
    )
    december = datetime(2024, 12, 31, 23, 59, tzinfo=timezone.utc)
    assert month_bounds(december)[1] == datetime(2025, 1, 1, tzinfo=timezone.utc)
    leap = datetime(2024, 2, 29, 12, tzinfo=timezone.utc)
    assert month_bounds(leap)[1] == datetime(2024, 3, 1, tzinfo=timezone.utc)
    assert over_cap(Decimal("5"), Decimal("5")) and not over_cap(Decimal("4.99"), Decimal("5"))
    assert not over_cap(Decimal("1e9"), None)


# --- against real stores -------------------------------------------------------------------
def _events(key: str, when: datetime) -> list:  # type: ignore[type-arg]
    return [
        # gpt-4o: 600k input x 2.50 + 400k cached x 1.25 + 100k output x 10 = 3.00
        make_event(
            "acct_a",
            key_id=key,
            model="gpt-4o-2024-08-06",
            created_at=when,
            tokens_after=1_000_000,
            cached_tokens=400_000,
            completion_tokens=100_000,
        ),
        # an unlisted model, the default row: 100k x 10 + 10k x 30 = 1.30
        make_event(
            "acct_a",
            key_id=key,
            model="mystery",
            created_at=when + timedelta(minutes=1),
            tokens_after=100_000,
            completion_tokens=10_000,
        ),
        # /v1/compress: 500k tokens scored x 1 = 0.50
        make_event(
            "acct_a",
            key_id=key,
            kind="compress",
            created_at=when + timedelta(minutes=2),
            tokens_before=500_000,
            tokens_after=100_000,
            completion_tokens=0,
        ),
    ]


def test_key_spend_prices_the_keys_rows_of_the_month_only(backend: Backend) -> None:
    store = backend.store
    store.write_events(_events("key_1", MAY - timedelta(days=3)))
    store.write_events(_events("key_2", MAY))  # another key
    store.write_events(_events("key_1", datetime(2024, 4, 30, 23, 50, tzinfo=timezone.utc)))
    start, end = month_bounds(MAY)
    assert key_spend(store, PRICES, "key_1", start, end) == Decimal("4.80")
    assert key_spend(store, PRICES, "key_2", start, end) == Decimal("4.80")
    assert key_spend(store, PRICES, "key_3", start, end) == Decimal(0)
    april = month_bounds(datetime(2024, 4, 2, tzinfo=timezone.utc))
    assert key_spend(store, PRICES, "key_1", *april) == Decimal("4.80")


def test_the_guard_refuses_at_the_cap_and_reads_the_database_once_per_interval(
    backend: Backend,
) -> None:
    clock = Clock(MAY)
    guard = SpendGuard(
        backend.store,
        PRICES,
        Decimal("5.00"),
        "usd",
        cache_s=5,
        clock=clock,
        monotonic=clock.monotonic,
    )
    backend.store.write_events(_events("key_1", MAY - timedelta(hours=2)))
    guard.check("key_1")  # 4.80 < 5.00
    assert guard.spent("key_1") == Decimal("4.80")
    # 0.30 more (100k gpt-4o output tokens): 5.10, but the cached 4.80 is still fresh.
    backend.store.write_events(
        [
            make_event(
                "acct_a",
                key_id="key_1",
                model="gpt-4o",
                created_at=MAY,
                tokens_after=0,
                completion_tokens=30_000,
            )
        ]
    )
    guard.check("key_1")
    asyncio.run(guard.acheck("key_1"))
    clock.ticks += 5  # the cache is stale: read again
    with pytest.raises(ProxyError) as caught:
        guard.check("key_1")
    error = caught.value
    assert (error.status, error.code) == (429, "spend_cap_reached")
    assert "5.00 USD" in error.message and "2024-06-01T00:00Z" in error.message
    with pytest.raises(ProxyError):
        asyncio.run(guard.acheck("key_1"))  # from the cache, no thread
    guard.check("key_2")  # its own spend: nothing yet
    guard.check(None)  # open auth mode: no key, nothing to cap
    # A new month starts from zero.
    clock.now = datetime(2024, 6, 1, 0, 0, 1, tzinfo=timezone.utc)
    guard.check("key_1")


def test_no_cap_reads_nothing_and_an_outage_keeps_the_last_figure(backend: Backend) -> None:
    clock = Clock(MAY)
    reads = 0
    store = backend.store
    real_read = store._read

    def counting_read(fn):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        return real_read(fn)

    store._read = counting_read  # type: ignore[method-assign]
    SpendGuard(store, PRICES, None, "usd", clock=clock, monotonic=clock.monotonic).check("key_1")
    assert reads == 0
    store.write_events(_events("key_1", MAY - timedelta(hours=2)))
    guard = SpendGuard(
        store, PRICES, Decimal("4.00"), "usd", cache_s=5, clock=clock, monotonic=clock.monotonic
    )
    with pytest.raises(ProxyError):
        guard.check("key_1")
    assert reads == 1

    def down(fn):  # type: ignore[no-untyped-def]
        raise StoreUnavailable("down")

    store._read = down  # type: ignore[method-assign]
    clock.ticks += 60
    with pytest.raises(ProxyError):  # the last known figure still counts
        guard.check("key_1")
    guard.check("key_never_seen")  # nothing known: fail open
