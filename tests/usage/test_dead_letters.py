"""One row that can never be stored must not stop accounting: the flusher sets it aside in
ccproxy_usage_dead_letters and every other event flows on. Real SQLite and real PostgreSQL."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from ccproxy.usage.deadletters import DeadLetter
from ccproxy.usage.events import UsageEvent
from ccproxy.usage.flusher import UsageFlusher
from ccproxy.usage.outbox import Outbox
from ccproxy.usage.store import PostgresStore, StoreUnavailable, UsageStore
from tests.usage.conftest import Backend
from tests.usage.helpers import BASE, free_port, make_event, spread_events

RANGE = (BASE - timedelta(days=1), BASE + timedelta(days=30))
NUL_MODEL = "gpt-4o\u0000mini"


class CountingStore:
    """Delegates to `target` (a test swaps it: down, then up) and counts the calls."""

    def __init__(self, target: UsageStore) -> None:
        self.target = target
        self.event_writes: list[int] = []
        self.letter_writes = 0

    def write_events(self, events: Sequence[UsageEvent]) -> int:
        self.event_writes.append(len(events))
        return self.target.write_events(events)

    def write_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        self.letter_writes += 1
        return self.target.write_dead_letters(letters)


class RemoveFailsOnce(Outbox):
    """A real outbox whose first remove() fails: the process died after the database commit."""

    failed = False

    def remove(self, seqs: Sequence[int]) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("killed")
        super().remove(seqs)


def _letters(backend: Backend) -> list[tuple[str | None, str | None, str, str, int]]:
    return [
        tuple(row)  # type: ignore[misc]
        for row in backend.query(
            "SELECT event_id, account_id, reason, event, event_chars "
            "FROM ccproxy_usage_dead_letters ORDER BY event_id"
        )
    ]


def _hourly_requests_and_after(backend: Backend, events: list[UsageEvent]) -> dict[str, tuple[int, int]]:
    out = {}
    for account in sorted({e.account_id for e in events}):
        rows = backend.store.hourly(account, *RANGE)
        out[account] = (sum(r.requests for r in rows), sum(r.tokens_after for r in rows))
    return out


def _expected(events: list[UsageEvent]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for e in events:
        n, after = out.get(e.account_id, (0, 0))
        out[e.account_id] = (n + 1, after + e.tokens_after)
    return dict(sorted(out.items()))


def _bad_event(backend: Backend) -> tuple[UsageEvent, str]:
    """A row this backend can never store, and the reason it is set aside with. PostgreSQL
    text cannot hold NUL (the issue's case); SQLite stores NUL, so there an integer too large
    for a 64-bit column stands in."""
    if backend.name == "postgres":
        return make_event("acct_a", model=NUL_MODEL), "DataError"
    return make_event("acct_a", tokens_before=2**70), "OverflowError"


def test_one_unstorable_event_among_50_is_dead_lettered_and_the_rest_flow_on(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    good = spread_events(50)
    bad, reason = _bad_event(backend)
    for e in good[:17]:
        outbox.append(e)
    outbox.append(bad)
    for e in good[17:]:
        outbox.append(e)
    flusher = UsageFlusher(outbox, backend.store, batch_size=500)
    with caplog.at_level(logging.ERROR, logger="ccproxy.usage.flusher"):
        assert flusher.flush_once() == 51
    assert outbox.pending() == 0
    assert backend.store.count_events([e.event_id for e in good]) == 50
    assert backend.store.count_events() == 50
    assert _hourly_requests_and_after(backend, good) == _expected(good)
    [(event_id, account_id, stored_reason, event, chars)] = _letters(backend)
    assert (event_id, account_id, stored_reason) == (bad.event_id, "acct_a", reason)
    assert json.loads(event)["event_id"] == bad.event_id and chars == len(bad.to_json())
    if backend.name == "postgres":
        assert json.loads(event)["model"] == NUL_MODEL  # escaped in the JSON, whole again decoded
    # The log names the event and the reason, never the row's values or the driver's message.
    assert bad.event_id in caplog.text and "mini" not in caplog.text and "NUL" not in caplog.text


def test_every_kind_of_bad_row_is_set_aside_with_its_reason(backend: Backend, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    good = spread_events(30)
    wrong_type = json.loads(make_event().to_json())
    wrong_type["model"] = ["a", "list"]
    missing_field = json.loads(make_event().to_json())
    del missing_field["status"]
    too_big = make_event(tokens_after=2**70)
    control = "event \u0000 with \x07 controls"  # PostgreSQL text cannot hold it as it is
    rows = [
        ("not json {", "undecodable:JSONDecodeError"),
        (json.dumps(wrong_type), "wrong_type:model"),
        (json.dumps(missing_field), "undecodable:TypeError"),
        (control, "undecodable:JSONDecodeError"),
        (too_big.to_json(), "NumericValueOutOfRange:22003" if backend.name == "postgres" else "OverflowError"),
    ]
    for i, e in enumerate(good):
        outbox.append(e)
        if i % 6 == 0:
            outbox.append_raw(rows[i // 6][0])
    flusher = UsageFlusher(outbox, backend.store, batch_size=7)  # bad rows in several batches
    assert flusher.flush_once() == 35
    assert outbox.pending() == 0
    assert backend.store.count_events() == 30
    assert _hourly_requests_and_after(backend, good) == _expected(good)
    letters = _letters(backend)
    assert sorted(reason for _, _, reason, _, _ in letters) == sorted(reason for _, reason in rows)
    stored_control = next(event for _, _, reason, event, _ in letters if event.startswith("event "))
    assert stored_control == "event \\u0000 with \\u0007 controls"


def test_a_huge_row_is_cut_in_the_dead_letter(backend: Backend, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    raw = "{" + "x" * 3_000_000  # a multi-MB row that is not even JSON
    outbox.append_raw(raw)
    assert UsageFlusher(outbox, backend.store).flush_once() == 1
    [(event_id, _, reason, event, chars)] = _letters(backend)
    assert (event_id, reason, chars) == (None, "undecodable:JSONDecodeError", 3_000_001)
    assert event == raw[:16_384]


def test_a_crash_after_the_dead_letter_commit_stores_it_once(backend: Backend, tmp_path: Path) -> None:
    outbox = RemoveFailsOnce(tmp_path / "outbox.sqlite")
    good = spread_events(9)
    bad, _ = _bad_event(backend)
    for e in [*good[:4], bad, *good[4:]]:
        outbox.append(e)
    flusher = UsageFlusher(outbox, backend.store)
    with pytest.raises(RuntimeError, match="killed"):
        flusher.flush_once()
    assert outbox.pending() == 10  # nothing left the outbox before its rows were committed
    assert flusher.flush_once() == 10
    assert backend.store.count_events() == 9 and len(_letters(backend)) == 1
    assert _hourly_requests_and_after(backend, good) == _expected(good)


def test_an_unreachable_database_is_retried_and_dead_letters_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    down = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    store = CountingStore(down)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    good = spread_events(50)
    bad, _ = _bad_event(backend)
    for e in [bad, *good]:
        outbox.append(e)
    flusher = UsageFlusher(outbox, store, batch_size=500)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            flusher.flush_once()
    # Each try is one write of the whole batch: a transient error is not split, and nothing
    # was set aside or removed.
    assert store.event_writes == [51, 51, 51] and store.letter_writes == 0
    assert outbox.pending() == 51
    assert _letters(backend) == []
    store.target = backend.store  # the database is back
    assert flusher.flush_once() == 51
    assert backend.store.count_events() == 50 and len(_letters(backend)) == 1
    assert store.letter_writes == 1
    down.close()


def test_the_flusher_thread_keeps_retrying_a_down_database_then_delivers(
    backend: Backend, tmp_path: Path
) -> None:
    down = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    store = CountingStore(down)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    good = spread_events(20)
    bad, _ = _bad_event(backend)
    for e in [*good[:10], bad, *good[10:]]:
        outbox.append(e)
    flusher = UsageFlusher(outbox, store, interval_s=0.02, max_backoff_s=0.05)  # type: ignore[arg-type]
    flusher.start()
    try:
        _wait_for(lambda: len(store.event_writes) >= 4)
        assert store.letter_writes == 0 and outbox.pending() == 21
        store.target = backend.store
        _wait_for(lambda: outbox.pending() == 0)
    finally:
        flusher.stop(5)
    assert backend.store.count_events() == 20 and len(_letters(backend)) == 1
    down.close()


def _wait_for(predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
