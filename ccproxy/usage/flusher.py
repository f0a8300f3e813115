"""Moves usage events from the outbox to the database, batch by batch, never dropping one.

Each batch is `write_events` (one transaction, idempotent) then `remove`: a crash between the
two leaves the batch in the outbox, and its replay inserts nothing new.

A transient error (database unreachable, busy) stops the flush and is retried with backoff. A
row that can never be stored (ccproxy/usage/rejects.py: a NUL in a text column, a number out of
range, a row that does not decode) must not hold up the rows behind it: the batch is halved
until the bad rows are alone (ccproxy/usage/isolate.py), every other row is written, and the bad
ones go to the dead-letter table, committed before any row leaves the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Protocol

from ccproxy.usage.deadletters import DeadLetter, dead_letter
from ccproxy.usage.events import UsageEvent
from ccproxy.usage.isolate import write_isolating
from ccproxy.usage.outbox import Outbox
from ccproxy.usage.rejects import rejection_reason, undecodable_reason
from ccproxy.usage.shape import wrong_type_field
from ccproxy.usage.store import UsageStore

log = logging.getLogger(__name__)


class FlushObserver(Protocol):
    """What the flusher reports as it goes (ccproxy/metrics.py: UsageMetrics)."""

    def dead_lettered(self, count: int) -> None: ...

    def outbox_state(self, pending: int, oldest_age_s: float) -> None: ...


class NoFlushMetrics:
    def dead_lettered(self, count: int) -> None:
        return None

    def outbox_state(self, pending: int, oldest_age_s: float) -> None:
        return None


def _decode(rows: list[tuple[int, str]]) -> tuple[list[tuple[int, str, UsageEvent]], list[DeadLetter]]:
    """The rows that decode into events, and dead letters for those that do not."""
    events: list[tuple[int, str, UsageEvent]] = []
    letters: list[DeadLetter] = []
    for seq, raw in rows:
        try:
            event = UsageEvent.from_json(raw)
        except Exception as exc:  # any way a row can fail to decode is the row's fault
            letters.append(dead_letter(raw, undecodable_reason(exc)))
            continue
        wrong = wrong_type_field(event)
        if wrong is None:
            events.append((seq, raw, event))
        else:
            letters.append(dead_letter(raw, f"wrong_type:{wrong}", event))
    return events, letters


class UsageFlusher:
    def __init__(
        self,
        outbox: Outbox,
        store: UsageStore,
        interval_s: float = 1.0,
        batch_size: int = 500,
        max_backoff_s: float = 30.0,
        observer: FlushObserver | None = None,
    ) -> None:
        self.outbox = outbox
        self.store = store
        self.observer: FlushObserver = observer or NoFlushMetrics()
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One flush at a time: the thread's and stop()'s final one must not interleave.
        self._flush_lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self.outbox.pending()

    def flush_once(self, deadline: float | None = None) -> int:
        """Deliver batches until the outbox is empty (or `deadline`, a time.monotonic(), has
        passed); returns how many rows left the outbox, dead letters included. Transient
        store errors propagate."""
        wait_s = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._flush_lock.acquire(timeout=wait_s):
            return 0  # the thread's own flush is still running and did not end in time
        moved = 0
        try:
            while deadline is None or time.monotonic() < deadline:
                batch = self.outbox.peek_raw(self.batch_size)
                if not batch:
                    break
                self._deliver(batch)
                moved += len(batch)
                if len(batch) < self.batch_size:
                    break
        finally:
            self._flush_lock.release()
        return moved

    def _deliver(self, batch: list[tuple[int, str]]) -> None:
        events, letters = _decode(batch)
        rejected = write_isolating(
            self.store.write_events, [event for _, _, event in events], rejection_reason
        )
        for index, reason in rejected:
            _, raw, event = events[index]
            letters.append(dead_letter(raw, reason, event))
        if letters:
            # Committed before the rows leave the outbox: a crash in between stores each
            # letter once (by its letter_id) when the batch is replayed.
            self.store.write_dead_letters(letters)
            self.observer.dead_lettered(len(letters))
            for letter in letters:
                # The id and the reason only: the row itself can hold anything.
                log.error(
                    "usage event %s set aside in ccproxy_usage_dead_letters (%s)",
                    letter.event_id,
                    letter.reason,
                )
        self.outbox.remove([seq for seq, _ in batch])

    def report(self) -> None:
        """Tell the observer how many events wait and how old the oldest is (0 when none)."""
        try:
            pending = self.outbox.pending()
            oldest = self.outbox.oldest_created_at()
        except Exception as exc:  # the outbox busy: the next report will do
            log.debug("outbox state unavailable (%s)", type(exc).__name__)
            return
        age_s = 0.0 if oldest is None else (datetime.now(timezone.utc) - oldest).total_seconds()
        self.observer.outbox_state(pending, max(0.0, age_s))

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("flusher already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> int:
        """Stop the thread, try one last flush within `timeout_s`; returns events still pending
        (they stay in the outbox for the next start)."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        try:
            self.flush_once(deadline)
        except Exception as exc:
            self._warn(exc, retry_in_s=None)
        return self.pending

    def _run(self) -> None:
        delay = self.interval_s
        self.report()
        while not self._stop.wait(delay):
            try:
                self.flush_once()
                delay = self.interval_s
            except Exception as exc:
                delay = min(max(delay * 2, 1.0), self.max_backoff_s)
                self._warn(exc, retry_in_s=delay)
            self.report()

    def _warn(self, exc: Exception, retry_in_s: float | None) -> None:
        # Counts and the error's type only: events carry no message text, but an error's own
        # message could quote the parameters of a statement.
        try:
            pending: int | str = self.outbox.pending()
        except Exception:
            pending = "unknown"
        when = "at the next start" if retry_in_s is None else f"in {retry_in_s:.1f}s"
        log.warning(
            "usage flush failed (%s); %s events kept in the outbox, retry %s",
            type(exc).__name__,
            pending,
            when,
        )
