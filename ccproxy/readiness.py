"""/readyz without a pile-up: the upstream check behind it runs once at a time, is cut off after
a couple of seconds, and its answer is reused for a second.

Load balancers and Kubernetes probe every few seconds from several places at once. Each probe
used to make its own upstream call with the upstream's full timeout, so a hung upstream left a
growing heap of calls waiting (and sockets open) while every probe hung too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# Under every probe timeout we ship (Fly and the chart: 5 s): a slow upstream
# reads as "not ready", never as a probe that timed out.
CHECK_TIMEOUT_S = 2.0
# Probes within this long of a finished check get its answer without asking the upstream again.
REMEMBER_S = 1.0


class ReadinessProbe:
    def __init__(
        self,
        check: Callable[[], Awaitable[bool]],
        timeout_s: float = CHECK_TIMEOUT_S,
        remember_s: float = REMEMBER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._timeout_s = timeout_s
        self._remember_s = remember_s
        self._clock = clock
        self._answer: bool | None = None
        self._answered_at = 0.0
        self._in_flight: asyncio.Future[bool] | None = None

    async def __call__(self) -> bool:
        if self._answer is not None and self._clock() - self._answered_at < self._remember_s:
            return self._answer
        if self._in_flight is None:
            self._in_flight = asyncio.ensure_future(self._run())
        # shield: a probe that gives up (its client hung up) must not cancel the others' check
        return await asyncio.shield(self._in_flight)

    async def _run(self) -> bool:
        try:
            answer = await asyncio.wait_for(self._check(), self._timeout_s)
        except Exception:  # timed out, or the check itself failed: not ready, either way
            answer = False
        self._answer, self._answered_at, self._in_flight = answer, self._clock(), None
        return answer
