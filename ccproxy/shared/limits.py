"""Per-key rate limits for the whole fleet: the token buckets of ccproxy/limits.py kept in Redis.

One Lua script per call does what `try_take`, `debit` and `credit` do in process, atomically and
on Redis's own clock (`TIME`), so workers and replicas with skewed clocks share one bucket per key
and one round trip decides. A script rather than the `limits` library: its strategies are fixed
and moving windows, which cannot carry the token debt a long completion leaves (`debit`) or the
refund of what compression dropped (`credit`), and the in-process and Redis limits must behave
alike. A bucket's key expires once it would be full again, so idle keys cost nothing.

Redis unreachable (CCPROXY_REDIS_TIMEOUT_S): CCPROXY_REDIS_FAIL_MODE `open` admits and logs,
`closed` answers 503 (counted as refused, reason `rate_limiter_unavailable`). Charges and refunds are sent without waiting (they change later requests,
not this one); one that fails is logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from ccproxy.limits import Kind, RateLimiter, rate_limited
from ccproxy.protocol import ProxyError
from ccproxy.settings import Settings
from ccproxy.shared.clients import async_client

logger = logging.getLogger("ccproxy")

# KEYS[1]: the bucket. ARGV: op ("take", "debit" or "credit"), cost, capacity, units per second.
# Returns the seconds to wait ("0" when taken), as a string (Lua numbers would be truncated).
BUCKET_SCRIPT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local op, cost = ARGV[1], tonumber(ARGV[2])
local capacity, rate = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'level', 'at')
local level, at = tonumber(state[1]), tonumber(state[2])
if level == nil or at == nil then level, at = capacity, now end
level = math.min(capacity, level + math.max(0, now - at) * rate)
at = math.max(now, at)
local wait = 0
if op == 'take' then
  local needed = math.min(cost, capacity)
  if level >= needed then level = level - cost else wait = (needed - level) / rate end
elseif op == 'debit' then
  level = level - cost
else
  level = math.min(capacity, level + cost)
end
redis.call('HSET', KEYS[1], 'level', string.format('%.6f', level), 'at', string.format('%.6f', at))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - level) / rate * 1000) + 1000)
return string.format('%.6f', wait)
"""

KEY_PREFIX = "ccproxy:rl:"


class Limiter(Protocol):
    """What the routes use: ccproxy.limits.RateLimiter in process, RedisRateLimiter shared."""

    async def aadmit_request(self, key: str) -> None: ...
    async def aadmit_tokens(self, key: str, tokens: int) -> None: ...
    def charge_tokens(self, key: str, tokens: int) -> None: ...
    def refund_tokens(self, key: str, tokens: int) -> None: ...


def unavailable() -> ProxyError:
    return ProxyError(
        503, "The rate limiter cannot be reached right now; please retry shortly.", type="server_error",
        code="rate_limiter_unavailable", headers={"retry-after": "1"},
    )


class RedisRateLimiter:
    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis
        requests_per_minute: int,
        tokens_per_minute: int,
        *,
        fail_open: bool = True,
        on_refused: Callable[[Kind], None] = lambda kind: None,
        on_unavailable: Callable[[], None] = lambda: None,
    ) -> None:
        self._client = client
        self._script = client.register_script(BUCKET_SCRIPT)
        self._limits: dict[Kind, int] = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._fail_open = fail_open
        self._on_refused = on_refused
        self._on_unavailable = on_unavailable
        self._sent: set[Any] = set()  # fire-and-forget calls (tasks or thread futures), kept until done
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _call(self, kind: Kind, key: str, op: str, cost: float) -> float:
        limit = self._limits[kind]
        wait = await self._script(keys=[f"{KEY_PREFIX}{kind}:{key}"], args=[op, cost, limit, limit / 60.0])
        return float(wait)

    async def _admit(self, kind: Kind, key: str, cost: float) -> None:
        if not self._limits[kind]:
            return
        self._loop = asyncio.get_running_loop()
        try:
            wait = await self._call(kind, key, "take", cost)
        except Exception as exc:  # redis.RedisError, OSError, timeouts: the same answer
            logger.warning("rate limiter unavailable (%s): %s", type(exc).__name__, "admitted" if self._fail_open else "refused")
            if self._fail_open:
                return
            self._on_unavailable()
            raise unavailable() from None
        if wait > 0:
            self._on_refused(kind)
            raise rate_limited(kind, self._limits[kind], wait)

    async def aadmit_request(self, key: str) -> None:
        await self._admit("requests", key, 1)

    async def aadmit_tokens(self, key: str, tokens: int) -> None:
        await self._admit("tokens", key, tokens)

    def charge_tokens(self, key: str, tokens: int) -> None:
        if self._limits["tokens"] and tokens > 0:
            self._send(self._call("tokens", key, "debit", tokens))

    def refund_tokens(self, key: str, tokens: int) -> None:
        if self._limits["tokens"] and tokens > 0:
            self._send(self._call("tokens", key, "credit", tokens))

    def _send(self, call: Coroutine[Any, Any, float]) -> None:
        try:
            future: Any = asyncio.get_running_loop().create_task(call)
        except RuntimeError:  # not on the loop (a thread): hand it to the worker's loop
            if self._loop is None:
                call.close()
                return
            future = asyncio.run_coroutine_threadsafe(call, self._loop)
        self._sent.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Any) -> None:
        self._sent.discard(future)
        if not future.cancelled() and future.exception() is not None:
            logger.warning("rate limiter charge not recorded: %s", type(future.exception()).__name__)

    async def drain(self) -> None:
        """Waits for the charges and refunds sent so far (tests; shutdown)."""
        while self._sent:
            # Tasks as they are; calls handed over from a thread are concurrent futures.
            waits = [f if isinstance(f, asyncio.Future) else asyncio.wrap_future(f) for f in list(self._sent)]
            await asyncio.gather(*waits, return_exceptions=True)


def build_limiter(settings: Settings, on_refused: Callable[[Kind], None], on_unavailable: Callable[[], None]) -> Limiter:
    """In process without CCPROXY_REDIS_URL; in Redis with it."""
    if settings.redis_url is None:
        return RateLimiter(
            settings.rate_limit_requests_per_minute, settings.rate_limit_tokens_per_minute, on_refused=on_refused
        )
    return RedisRateLimiter(
        async_client(settings), settings.rate_limit_requests_per_minute, settings.rate_limit_tokens_per_minute,
        fail_open=settings.redis_fail_mode == "open", on_refused=on_refused, on_unavailable=on_unavailable,
    )
