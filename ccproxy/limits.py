"""Per-key rate limits and a per-worker concurrency cap.

Both live in the memory of one Gateway worker: nothing is shared between workers or hosts, so
a key served by N workers can get up to N times its limits. That keeps the hot path free of a
network round trip; with CCPROXY_REDIS_URL the same buckets live in Redis for the whole fleet
(ccproxy/shared/limits.py). The concurrency cap stays per worker: it protects the worker.

The maths are pure functions over an immutable ``Bucket`` and an explicit ``now``, so the unit
tests drive them with a fake clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ccproxy.error_shapes import error_payload
from ccproxy.protocol import ProxyError

# --- token buckets (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """``level`` units were available at monotonic time ``at``; a level below 0 is debt."""

    level: float
    at: float


def refilled(bucket: Bucket, capacity: float, per_second: float, now: float) -> Bucket:
    elapsed = max(0.0, now - bucket.at)  # a clock that steps back must not drain the bucket
    return Bucket(min(capacity, bucket.level + elapsed * per_second), max(now, bucket.at))


def try_take(
    bucket: Bucket, cost: float, capacity: float, per_second: float, now: float
) -> tuple[Bucket, float]:
    """Take ``cost`` units if they are there: (the bucket after, 0.0) or (unchanged, seconds to wait).

    A cost above the capacity is admitted once the bucket is full and leaves it in debt, so one
    oversized request is possible but pays for itself by delaying the next ones; refusing it
    outright would give a caller a 429 that no amount of waiting cures.
    """
    current = refilled(bucket, capacity, per_second, now)
    needed = min(cost, capacity)
    if current.level >= needed:
        return Bucket(current.level - cost, current.at), 0.0
    return current, (needed - current.level) / per_second


def debit(bucket: Bucket, cost: float, capacity: float, per_second: float, now: float) -> Bucket:
    """Charge units that were spent already (completion tokens); the level may go negative."""
    current = refilled(bucket, capacity, per_second, now)
    return Bucket(current.level - cost, current.at)


def credit(bucket: Bucket, amount: float, capacity: float, per_second: float, now: float) -> Bucket:
    """Give back units taken for work that did not happen (prompt tokens compression dropped);
    never above the capacity."""
    current = refilled(bucket, capacity, per_second, now)
    return Bucket(min(capacity, current.level + amount), current.at)


def retry_after_header(seconds: float) -> str:
    """HTTP's Retry-After takes whole seconds; rounding down would invite a second refusal."""
    return str(max(1, math.ceil(seconds)))


# --- per-key limits ---------------------------------------------------------------------------

Kind = Literal["requests", "tokens"]


class _PerMinute:
    """One bucket per key holding ``limit`` units that refill evenly over a minute."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self.limit = limit
        self._per_second = limit / 60.0
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}

    def _bucket(self, key: str, now: float) -> Bucket:
        return self._buckets.get(key) or Bucket(float(self.limit), now)

    def take(self, key: str, cost: float) -> float:
        now = self._clock()
        bucket, wait = try_take(self._bucket(key, now), cost, self.limit, self._per_second, now)
        self._buckets[key] = bucket
        return wait

    def charge(self, key: str, cost: float) -> None:
        now = self._clock()
        self._buckets[key] = debit(self._bucket(key, now), cost, self.limit, self._per_second, now)

    def refund(self, key: str, amount: float) -> None:
        now = self._clock()
        self._buckets[key] = credit(self._bucket(key, now), amount, self.limit, self._per_second, now)


def rate_limited(kind: Kind, limit: int, wait_s: float) -> ProxyError:
    unit = "requests" if kind == "requests" else "tokens"
    return ProxyError(
        429,
        f"Rate limit reached for this API key: {limit} {unit} per minute. "
        f"Please try again in {wait_s:.1f}s.",
        type=kind,
        code="rate_limit_exceeded",
        headers={"retry-after": retry_after_header(wait_s)},
    )


class RateLimiter:
    """Requests per minute and tokens per minute per API key; a limit of 0 is off."""

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[Kind], None] = lambda kind: None,
    ) -> None:
        self._requests = _PerMinute(requests_per_minute, clock) if requests_per_minute else None
        self._tokens = _PerMinute(tokens_per_minute, clock) if tokens_per_minute else None
        self._on_refused = on_refused

    def admit_request(self, key: str) -> None:
        if self._requests is not None:
            wait = self._requests.take(key, 1)
            if wait > 0:
                self._on_refused("requests")
                raise rate_limited("requests", self._requests.limit, wait)

    # The routes' interface (ccproxy.shared.limits.Limiter), which a limiter in Redis needs async.
    async def aadmit_request(self, key: str) -> None:
        self.admit_request(key)

    async def aadmit_tokens(self, key: str, tokens: int) -> None:
        self.admit_tokens(key, tokens)

    def admit_tokens(self, key: str, tokens: int) -> None:
        if self._tokens is not None:
            wait = self._tokens.take(key, tokens)
            if wait > 0:
                self._on_refused("tokens")
                raise rate_limited("tokens", self._tokens.limit, wait)

    def charge_tokens(self, key: str, tokens: int) -> None:
        if self._tokens is not None and tokens > 0:
            self._tokens.charge(key, tokens)

    def refund_tokens(self, key: str, tokens: int) -> None:
        if self._tokens is not None and tokens > 0:
            self._tokens.refund(key, tokens)


# --- concurrency cap --------------------------------------------------------------------------

OVERLOADED_RETRY_AFTER_S = 1


class ConcurrencyGate:
    """Counts requests in flight in one worker. No lock: a worker runs one event loop."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.in_flight = 0

    def enter(self) -> bool:
        if self.cap and self.in_flight >= self.cap:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


class ConcurrencyLimitMiddleware:
    """Refuses work beyond the cap at once with 503 + Retry-After instead of queueing it:
    a queue in front of a slow upstream only turns overload into timeouts.

    It wraps the whole response, so a streamed answer holds its slot until its last byte.
    """

    def __init__(
        self, app: ASGIApp, cap: int, limited: Callable[[str], bool], on_refused: Callable[[], None] = lambda: None
    ) -> None:
        self.app = app
        self.gate = ConcurrencyGate(cap)
        self._limited = limited  # which paths the cap guards
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._limited(scope["path"]) or not self.gate.cap:
            await self.app(scope, receive, send)
            return
        if not self.gate.enter():
            self._on_refused()
            response = JSONResponse(
                error_payload(
                    scope["path"], 503,
                    "The server is handling too many requests right now; please retry shortly.",
                    type="server_error",
                    code="server_overloaded",
                ),
                status_code=503,
                headers={"retry-after": str(OVERLOADED_RETRY_AFTER_S)},
            )
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave()
