"""How a blocking Redis user behaves while Redis is down: after a failure it leaves Redis alone
for a few seconds (the worker's own copy answers meanwhile), rather than waiting out the timeout
on every call."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("ccproxy")

PAUSE_AFTER_FAILURE_S = 5.0


class Outage:
    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic, pause_s: float = PAUSE_AFTER_FAILURE_S) -> None:
        self._what = what  # for the log line: "history memo", "retrieval store"
        self._clock = clock
        self._pause_s = pause_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.failures = 0

    def usable(self) -> bool:
        return self._clock() >= self._down_until

    def failed(self, exc: Exception) -> None:
        with self._lock:
            self.failures += 1
            self._down_until = self._clock() + self._pause_s
        logger.warning("%s: Redis unavailable (%s); using this worker's own", self._what, type(exc).__name__)
