"""Handing a request's usage event to the durable outbox, off the answer's critical path.

Nothing is dropped silently: an event the outbox refused (disk full, file locked for too
long) stays in memory, is logged with its id, and goes first at the next append.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from ccproxy.usage.events import UsageEvent
from ccproxy.usage.outbox import Outbox

logger = logging.getLogger("ccproxy.usage")


class UsageRecorder:
    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._unsaved: list[UsageEvent] = []
        self._lock = threading.Lock()

    def record_now(self, event: UsageEvent) -> None:
        """Blocking append, for places that cannot await (a stream being torn down)."""
        with self._lock:
            waiting, self._unsaved = [*self._unsaved, event], []
            for index, pending in enumerate(waiting):
                try:
                    self._outbox.append(pending)
                except Exception as exc:
                    self._unsaved = waiting[index:]
                    logger.error(
                        "usage outbox refused event %s (%s); %d event(s) held in memory",
                        pending.event_id,
                        type(exc).__name__,
                        len(self._unsaved),
                    )
                    return

    async def record(self, event: UsageEvent) -> None:
        await asyncio.to_thread(self.record_now, event)
