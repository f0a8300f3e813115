from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from ccproxy.usage.events import UsageEvent
from ccproxy.usage.flusher import UsageFlusher
from ccproxy.usage.outbox import Outbox
from ccproxy.usage.store import PostgresStore, StoreUnavailable, UsageStore
from tests.usage.conftest import Backend
from tests.usage.helpers import BASE, free_port, spread_events

RANGE = (BASE - timedelta(days=1), BASE + timedelta(days=30))


class SwitchableStore:
    """Delegates write_events to `target`, which a test swaps (down, then up)."""

    def __init__(self, target: UsageStore) -> None:
        self.target = target
        self.calls = 0

    def write_events(self, events: Sequence[UsageEvent]) -> int:
        self.calls += 1
        return self.target.write_events(events)


def _wait_for(predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _totals(backend: Backend, events: list[UsageEvent]) -> dict[str, tuple[int, int]]:
    out = {}
    for account in sorted({e.account_id for e in events}):
        rows = backend.store.hourly(account, *RANGE)
        out[account] = (sum(r.requests for r in rows), sum(r.tokens_saved for r in rows))
    return out


def _expected(events: list[UsageEvent]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for e in events:
        n, saved = out.get(e.account_id, (0, 0))
        out[e.account_id] = (n + 1, saved + e.tokens_saved)
    return dict(sorted(out.items()))


def test_flush_once_moves_everything_in_batches(backend: Backend, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    events = spread_events(23)
    for e in events:
        outbox.append(e)
    flusher = UsageFlusher(outbox, backend.store, interval_s=60, batch_size=5)
    assert flusher.flush_once() == 23
    assert flusher.pending == 0 and flusher.flush_once() == 0
    assert backend.store.count_events() == 23
    assert _totals(backend, events) == _expected(events)


def test_crash_between_write_and_remove_replays_without_double_counting(
    backend: Backend, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    events = spread_events(12)
    for e in events:
        outbox.append(e)
    backend.store.write_events([e for _, e in outbox.peek(7)])  # written, never removed
    assert UsageFlusher(outbox, backend.store, batch_size=5).flush_once() == 12
    assert backend.store.count_events() == 12
    assert _totals(backend, events) == _expected(events)


def test_database_down_keeps_events_then_delivers_them_exactly_once(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    store = SwitchableStore(down)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    flusher = UsageFlusher(outbox, store, interval_s=0.02, batch_size=10, max_backoff_s=0.1)  # type: ignore[arg-type]
    events = spread_events(35)
    for e in events[:20]:
        outbox.append(e)
    with pytest.raises(StoreUnavailable):
        flusher.flush_once()
    assert flusher.pending == 20
    with caplog.at_level(logging.WARNING, logger="ccproxy.usage.flusher"):
        flusher.start()
        _wait_for(lambda: store.calls >= 4)  # it keeps retrying, with backoff
        for e in events[20:]:
            outbox.append(e)
        assert flusher.pending == 35
        calls = store.calls
        _wait_for(lambda: store.calls >= calls + 2)  # a retry that started after the appends
        assert "StoreUnavailable" in caplog.text and "35 events kept" in caplog.text

        store.target = backend.store  # the database is back
        _wait_for(lambda: flusher.pending == 0)
    assert flusher.stop(5) == 0
    assert backend.store.count_events([e.event_id for e in events]) == 35
    assert backend.store.count_events() == 35
    assert _totals(backend, events) == _expected(events)
    down.close()


def test_stop_flushes_what_is_left(backend: Backend, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    flusher = UsageFlusher(outbox, backend.store, interval_s=3600, batch_size=500)
    flusher.start()
    events = spread_events(17)
    for e in events:
        outbox.append(e)
    assert flusher.stop(10) == 0
    assert backend.store.count_events() == 17
    assert _totals(backend, events) == _expected(events)


def test_stop_with_the_database_down_keeps_the_events(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    down = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    flusher = UsageFlusher(outbox, down, interval_s=3600)
    flusher.start()
    for e in spread_events(4):
        outbox.append(e)
    assert flusher.stop(5) == 4
    assert Outbox(tmp_path / "outbox.sqlite").pending() == 4
