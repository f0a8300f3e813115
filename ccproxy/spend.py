"""Gateway-side spending checks: which models callers may use, and a monthly spend cap per key.

    allowed_models  (CCPROXY_ALLOWED_MODELS)  -> check_model_allowed(model, allowed): 403
    spend cap       (CCPROXY_SPEND_CAP_PER_KEY_MONTHLY) -> SpendGuard.check / acheck: 429

The policy (`model_allowed`, `month_start`, `over_cap`) is pure. The spend so far is the price
table (ccproxy/pricing.py) applied to the key's hourly usage rows of the current calendar month
(UTC), exact (no rounding: nothing is invoiced here), the same numbers the billing job prices.
It is read at most once per `cache_s` per key and worker, so a request costs no database round
trip. The cap is therefore soft: usage reaches the hourly rows after the usage flush
(CCPROXY_USAGE_FLUSH_INTERVAL_S) and the cached figure is up to `cache_s` old, so requests in
that window, and those in flight, can go past it.

When the database cannot be read, the last known figure is used if there is one, else the
request passes (fail-open, like usage recording): an outage must not stop all traffic.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ccproxy.pricing import PriceTable, load_table
from ccproxy.protocol import ProxyError
from ccproxy.usage.events import as_utc
from ccproxy.usage.store import SqlStore, StoreUnavailable

if TYPE_CHECKING:
    from ccproxy.settings import Settings

# Keys whose spend is cached per worker; beyond it the oldest entries go.
_MAX_CACHED_KEYS = 100_000


# --- model allow-list --------------------------------------------------------------------------
def model_allowed(model: str, allowed: Sequence[str] | None) -> bool:
    """None allows every model; otherwise an exact name, or a prefix given as `name*`."""
    if allowed is None:
        return True
    for entry in allowed:
        if entry.endswith("*"):
            if model.startswith(entry[:-1]):
                return True
        elif model == entry:
            return True
    return False


def check_model_allowed(model: str, allowed: Sequence[str] | None) -> None:
    """Raise 403 `model_not_allowed` (OpenAI shape) unless `model` may be used. The message
    does not repeat the model name: it is caller input, and may be huge or hostile."""
    if not model_allowed(model, allowed):
        raise ProxyError(
            403,
            "This model is not available through this proxy. GET /v1/models lists the models "
            "the upstream offers; ask the operator which of them are enabled.",
            type="invalid_request_error",
            param="model",
            code="model_not_allowed",
        )


# --- the monthly spend cap ---------------------------------------------------------------------
def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """[first instant of `now`'s calendar month, first instant of the next), in UTC."""
    start = as_utc(now).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        return start, start.replace(year=start.year + 1, month=1)
    return start, start.replace(month=start.month + 1)


def over_cap(spent: Decimal, cap: Decimal | None) -> bool:
    """A key has reached its cap once it has spent the cap (a cap of 0 blocks at once)."""
    return cap is not None and spent >= cap


def spend_cap_error(cap: Decimal, currency: str, now: datetime) -> ProxyError:
    _, next_month = month_bounds(now)
    return ProxyError(
        429,
        f"This API key has reached its monthly spend cap of {cap:f} {currency.upper()}. "
        f"It resets at {next_month:%Y-%m-%dT%H:%MZ}; ask the operator to raise the cap.",
        type="insufficient_quota",
        code="spend_cap_reached",
    )


def key_spend(
    store: SqlStore, prices: PriceTable, key_id: str, start: datetime, end: datetime
) -> Decimal:
    """The key's usage in hours [start, end), priced with the table (exact Decimal)."""
    sql = store._q(
        "SELECT model, kind, SUM(tokens_before), SUM(tokens_after), SUM(cached_tokens), "
        "SUM(completion_tokens) FROM ccproxy_usage_hourly "
        "WHERE key_id = ? AND hour >= ? AND hour < ? GROUP BY model, kind"
    )
    params = (key_id, store._ts(start), store._ts(end))
    rows: list[tuple[Any, ...]] = store._read(lambda conn: conn.execute(sql, params).fetchall())
    total = Decimal(0)
    for model, kind, before, after, cached, completion in rows:
        cost = prices.usage_cost(kind, model, int(before), int(after), int(cached), int(completion))
        total += cost.total
    return total


@dataclass
class _Cached:
    month: datetime
    spent: Decimal
    read_at: float


class SpendGuard:
    """The per-key monthly spend cap of one worker. Thread-safe; `acheck` for async code."""

    def __init__(
        self,
        store: SqlStore,
        prices: PriceTable,
        cap: Decimal | None,
        currency: str,
        *,
        cache_s: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._prices = prices
        self.cap = cap
        self._currency = currency
        self._cache_s = cache_s
        self._clock = clock
        self._monotonic = monotonic
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, store: SqlStore, settings: Settings) -> SpendGuard:
        """The guard the settings describe (disabled when no cap is set). Raises
        PriceTableError on a bad CCPROXY_BILLING_PRICES: call it at startup."""
        return cls(
            store,
            load_table(settings.billing_prices, settings.billing_price_per_million_tokens),
            settings.spend_cap_per_key_monthly,
            settings.billing_currency,
            cache_s=settings.spend_cap_cache_s,
        )

    @property
    def enabled(self) -> bool:
        return self.cap is not None

    def _fresh(self, key_id: str, month: datetime) -> _Cached | None:
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is None or cached.month != month:
            return None
        return cached

    def spent(self, key_id: str) -> Decimal | None:
        """The key's spend this month: cached if fresh, else read. None when the database
        cannot be read and nothing is known for this month."""
        month, next_month = month_bounds(self._clock())
        cached = self._fresh(key_id, month)
        if cached is not None and self._monotonic() - cached.read_at < self._cache_s:
            return cached.spent
        try:
            spent = key_spend(self._store, self._prices, key_id, month, next_month)
        except StoreUnavailable:
            return cached.spent if cached is not None else None
        with self._lock:
            if len(self._cache) >= _MAX_CACHED_KEYS and key_id not in self._cache:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key_id] = _Cached(month, spent, self._monotonic())
        return spent

    def check(self, key_id: str | None) -> None:
        """Raise 429 `spend_cap_reached` when the key has spent its monthly cap. No cap, or
        no key (open auth mode): nothing to check."""
        if self.cap is None or key_id is None:
            return
        spent = self.spent(key_id)
        if spent is not None and over_cap(spent, self.cap):
            raise spend_cap_error(self.cap, self._currency, self._clock())

    async def acheck(self, key_id: str | None) -> None:
        """`check` for the event loop: answered from the cache when it is fresh; the
        database read, when one is due, runs in a thread."""
        if self.cap is None or key_id is None:
            return
        month, _ = month_bounds(self._clock())
        cached = self._fresh(key_id, month)
        if cached is not None and self._monotonic() - cached.read_at < self._cache_s:
            if over_cap(cached.spent, self.cap):
                raise spend_cap_error(self.cap, self._currency, self._clock())
            return
        await asyncio.to_thread(self.check, key_id)
