"""Moves usage events from the outbox to the database, batch by batch, never dropping one.

Each batch is `write_events` (one transaction, idempotent) then `remove`: a crash between the
two leaves the batch in the outbox, and its replay inserts nothing new.
"""

from __future__ import annotations

import logging
import threading
import time

from ccproxy.usage.outbox import Outbox
from ccproxy.usage.store import UsageStore

log = logging.getLogger(__name__)


class UsageFlusher:
    def __init__(
        self,
        outbox: Outbox,
        store: UsageStore,
        interval_s: float = 1.0,
        batch_size: int = 500,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.outbox = outbox
        self.store = store
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
        passed); returns how many events left the outbox. Store errors propagate."""
        wait_s = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._flush_lock.acquire(timeout=wait_s):
            return 0  # the thread's own flush is still running and did not end in time
        moved = 0
        try:
            while deadline is None or time.monotonic() < deadline:
                batch = self.outbox.peek(self.batch_size)
                if not batch:
                    break
                self.store.write_events([event for _, event in batch])
                self.outbox.remove([seq for seq, _ in batch])
                moved += len(batch)
                if len(batch) < self.batch_size:
                    break
        finally:
            self._flush_lock.release()
        return moved

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
        while not self._stop.wait(delay):
            try:
                self.flush_once()
                delay = self.interval_s
            except Exception as exc:
                delay = min(max(delay * 2, 1.0), self.max_backoff_s)
                self._warn(exc, retry_in_s=delay)

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
