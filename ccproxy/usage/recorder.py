"""Handing a request's usage event to the durable outbox, off the answer's critical path.

Nothing is dropped silently. An event the outbox refuses (disk full, file locked for too long)
goes to the spill file (ccproxy/usage/spill.py), which survives a restart and is replayed into
the outbox at the next start, or as soon as the outbox accepts an event again. When the spill
file refuses it too, the event waits in memory, up to `max_held` events, and goes first at the
next append; past that the oldest is dropped, counted (`on_drop`) and logged by its id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable

from ccproxy.usage.events import UsageEvent
from ccproxy.usage.outbox import Outbox
from ccproxy.usage.spill import SpillFile

logger = logging.getLogger("ccproxy.usage")

# ~500 bytes an event: at most about 0.5 MB of memory while both the outbox and the spill
# file refuse (a full disk), about a minute of a busy worker's traffic.
MAX_HELD = 1_000


def _no_drop_counter() -> None:
    return None


class UsageRecorder:
    def __init__(
        self,
        outbox: Outbox,
        spill: SpillFile | None = None,
        *,
        max_held: int = MAX_HELD,
        on_drop: Callable[[], None] = _no_drop_counter,
    ) -> None:
        self._outbox = outbox
        self._spill = spill
        self._held: deque[UsageEvent] = deque()
        self._max_held = max_held
        self._on_drop = on_drop
        self._lock = threading.Lock()
        # Events spilled by an earlier run (or another worker) go to the outbox now.
        self._spill_waiting = spill is not None and spill.has_lines()
        with self._lock:
            self._replay_spill()

    def record_now(self, event: UsageEvent) -> None:
        """Blocking append, for places that cannot await (a stream being torn down)."""
        with self._lock:
            waiting = [*self._held, event]
            self._held.clear()
            refused = False
            for pending in waiting:
                try:
                    self._outbox.append(pending)
                except Exception as exc:
                    refused = True
                    self._refused(pending, exc)
            if not refused:
                self._replay_spill()

    async def record(self, event: UsageEvent) -> None:
        await asyncio.to_thread(self.record_now, event)

    def _refused(self, event: UsageEvent, exc: Exception) -> None:
        if self._spill is not None:
            try:
                self._spill.append(event)
                self._spill_waiting = True
                logger.error(
                    "usage outbox refused event %s (%s); written to the spill file",
                    event.event_id,
                    type(exc).__name__,
                )
                return
            except OSError as spill_exc:
                exc = spill_exc
        if len(self._held) >= self._max_held:
            dropped = self._held.popleft()
            self._on_drop()
            logger.error("usage event %s dropped: outbox and spill file refuse", dropped.event_id)
        self._held.append(event)
        logger.error(
            "usage outbox refused event %s (%s); %d event(s) held in memory",
            event.event_id,
            type(exc).__name__,
            len(self._held),
        )

    def _replay_spill(self) -> None:
        """Move spilled lines into the outbox once it takes events again (caller holds the lock)."""
        if self._spill is None or not self._spill_waiting:
            return
        try:
            moved = self._spill.replay(self._outbox.append_raw)
        except Exception as exc:  # still refused: the claimed file stays for the next try
            logger.warning("usage spill file not replayed yet (%s)", type(exc).__name__)
            return
        self._spill_waiting = False
        if moved:
            logger.info("replayed %d usage event(s) from the spill file into the outbox", moved)
