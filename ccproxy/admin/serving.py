"""GET /admin/api/summary: the operator's view of every account's usage and savings.

Answered only with `Authorization: Bearer <CCPROXY_ADMIN_TOKEN>`; with no token configured the
route does not exist (404), so a default install exposes nothing. Wrong tokens spend the
client address's failed-auth budget (as wrong API keys do), so guessing costs a minute per
CCPROXY_AUTH_FAILURES_PER_MINUTE tries. The answer holds ids, names, labels and numbers only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from datetime import datetime, timezone
from typing import Any

from ccproxy.admin.queries import read_admin_data
from ccproxy.admin.report import build_admin_report
from ccproxy.auth import FailedAuthLimiter
from ccproxy.pricing import PriceTable, load_table
from ccproxy.protocol import ProxyError, unknown_endpoint, usage_unavailable
from ccproxy.settings import Settings
from ccproxy.usage.report import usage_window
from ccproxy.usage.store import SqlStore

logger = logging.getLogger("ccproxy")


def bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class AdminApi:
    def __init__(self, settings: Settings) -> None:
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        self._token = token.encode() if token else None
        self._failures = FailedAuthLimiter(settings.auth_failures_per_minute)
        self._settings = settings
        self._prices: PriceTable | None = None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def admit(self, authorization: str | None, client: str | None) -> None:
        """Raise 404 when the admin API is off, 429 for an address out of tries, 401 for a
        wrong or missing token."""
        if self._token is None:
            raise unknown_endpoint()
        self._failures.check(client)
        sent = bearer_token(authorization).encode()
        if not hmac.compare_digest(sent, self._token):
            self._failures.failed(client)
            raise ProxyError(
                401, "This page needs the operator's key (CCPROXY_ADMIN_TOKEN) as 'Authorization: Bearer <key>'.",
                type="invalid_request_error", code="invalid_admin_token",
            )

    def prices(self) -> PriceTable:
        # Read once, on first use: the same table the billing job and the spend cap price with.
        if self._prices is None:
            s = self._settings
            self._prices = load_table(s.billing_prices, s.billing_price_per_million_tokens)
        return self._prices

    async def summary(self, store: SqlStore, start: str | None, end: str | None, granularity: str) -> dict[str, Any]:
        if granularity not in ("hour", "day"):
            raise ProxyError(400, "granularity must be 'hour' or 'day'.", param="granularity")
        try:
            window = usage_window(start, end, granularity, datetime.now(timezone.utc))
        except ValueError as exc:
            raise ProxyError(400, str(exc), param="from") from None
        try:
            data = await asyncio.to_thread(read_admin_data, store, *window)
        except Exception as exc:
            logger.warning("admin summary query failed: %s", type(exc).__name__)
            raise usage_unavailable() from None
        return build_admin_report(
            data.groups, data.series, data.outcomes, *window, granularity,  # type: ignore[arg-type]
            self.prices(), self._settings.billing_currency, truncated=data.truncated,
        )
