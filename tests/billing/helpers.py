"""Seeding usage and building clients for the billing tests."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from billing.runner import RunConfig
from billing.stripe_client import StripeClient
from ccproxy.pricing import PriceTable, parse_table
from ccproxy.usage.store import SqlStore
from tests.billing.fake_stripe import FakeStripe
from tests.usage.helpers import BASE, make_event

# The input price of every model the tests' table does not name (make_event's gpt-4o-mini).
PRICE = Decimal("2.50")
PRICES: PriceTable = parse_table(
    """{"default": {"input": "2.50", "cached_input": "1.25", "output": "10.00"},
        "compress": {"input": "0.40"},
        "models": {"gpt-4o": {"input": "5.00", "cached_input": "2.50", "output": "15.00"},
                   "o1": {"input": "15.00", "cached_input": "7.50", "output": "60.00"}}}"""
)
# Hours BASE .. BASE+3h are closed at this time (10 minutes' close delay).
NOW = BASE + timedelta(hours=4, minutes=30)


def seed(
    store: SqlStore, account: str, tokens_by_hour: dict[int, int], **fields: object
) -> str:
    """Usage for `account` (created if new): per hour offset from BASE, two events whose
    tokens_after add up to the given number, with no completion tokens unless `fields` say
    otherwise (per event). Returns the account id."""
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
                    **{"completion_tokens": 0, **fields},  # type: ignore[arg-type]
                )
            )
    store.write_events(events)
    return account_id


def config(mode: str = "meters", **overrides: object) -> RunConfig:
    values: dict[str, object] = dict(
        mode=mode,
        prices=PRICES,
        currency="usd",
        meter_event_name="ccproxy_usage_micro",
        price_lookup_key="ccproxy_usage_micro",
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


def subscribe_in_fake(fake: FakeStripe, *customers: str, status: str = "active") -> None:
    """The metered price and an active subscription to it per customer, as `setup` and
    `customers subscribe` leave them in Stripe."""
    if not any(o["object"] == "price" for o in fake.objects("price")):
        fake.add(
            {
                "id": "price_usage",
                "object": "price",
                "active": True,
                "lookup_key": "ccproxy_usage_micro",
                "currency": "usd",
                "unit_amount_decimal": "0.0001",
                "recurring": {"usage_type": "metered", "meter": "mtr_1"},
            }
        )
    for customer in customers:
        fake.add(
            {
                "id": f"sub_{customer}",
                "object": "subscription",
                "status": status,
                "customer": customer,
                "price": "price_usage",
            }
        )


def at(hour_offset: int) -> datetime:
    return BASE + timedelta(hours=hour_offset)
