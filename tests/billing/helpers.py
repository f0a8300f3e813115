"""Seeding usage and building clients for the billing tests."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from billing.runner import RunConfig
from billing.stripe_client import StripeClient
from ccproxy.usage.store import SqlStore
from tests.usage.helpers import BASE, make_event

PRICE = Decimal("2.50")
# Hours BASE .. BASE+3h are closed at this time (10 minutes' close delay).
NOW = BASE + timedelta(hours=4, minutes=30)


def seed(store: SqlStore, account: str, tokens_by_hour: dict[int, int]) -> str:
    """Usage for `account` (created if new): per hour offset from BASE, two events whose
    tokens_after add up to the given number. Returns the account id."""
    account_id = store.ensure_account(account)
    events = []
    for offset, tokens in tokens_by_hour.items():
        start = BASE + timedelta(hours=offset)
        first = tokens // 3
        for minute, part in ((5, first), (40, tokens - first)):
            events.append(
                make_event(
                    account_id,
                    created_at=start + timedelta(minutes=minute),
                    tokens_before=part * 2,
                    tokens_after=part,
                    tokens_saved=part,
                )
            )
    store.write_events(events)
    return account_id


def config(mode: str = "meters", **overrides: object) -> RunConfig:
    values: dict[str, object] = dict(
        mode=mode,
        price_per_million=PRICE,
        currency="usd",
        meter_event_name="ccproxy_tokens_after",
        close_delay_s=600,
        lookback_hours=816,
    )
    values.update(overrides)
    return RunConfig(**values)  # type: ignore[arg-type]


class Sleeps(list[float]):
    """Records the backoff delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(url: str, sleeps: Sleeps | None = None, max_retries: int = 3) -> StripeClient:
    return StripeClient(
        "sk_test_billing",
        url,
        max_retries=max_retries,
        timeout_s=5,
        sleep=sleeps if sleeps is not None else Sleeps(),
    )


def at(hour_offset: int) -> datetime:
    return BASE + timedelta(hours=hour_offset)
