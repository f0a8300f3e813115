"""The Stripe objects the job bills against, created once and found again on every later call:
the meter, its product and metered price (`python -m billing setup`), and each account's
customer and subscription (`python -m billing customers ...`).

Each function looks before it creates, and creates with an idempotency key, so running it
twice (or after a crash) makes nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from billing.job import MICRO_UNIT_AMOUNT_DECIMAL, BillingAccount, post_request
from billing.ledger import BillingLedger
from billing.stripe_client import StripeClient, StripeError

# The meter's payload keys: Stripe's defaults, which meter_event_request sends.
CUSTOMER_KEY = "stripe_customer_id"
VALUE_KEY = "value"


@dataclass(frozen=True)
class CatalogConfig:
    meter_event_name: str
    price_lookup_key: str
    currency: str


@dataclass(frozen=True)
class SetupResult:
    meter_id: str
    product_id: str
    price_id: str
    unit_amount_decimal: str
    created: tuple[str, ...]  # which of meter/product/price this call created
    notes: tuple[str, ...] = ()


def _list(client: StripeClient, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    after: str | None = None
    while True:
        page = client.get(path, {**params, "limit": 100, "starting_after": after})
        data = page.get("data") or []
        yield from data
        if not page.get("has_more") or not data:
            return
        after = str(data[-1]["id"])


def find_meter(client: StripeClient, event_name: str) -> dict[str, Any] | None:
    for meter in _list(client, "/v1/billing/meters", {"status": "active"}):
        if meter.get("event_name") == event_name:
            return meter
    return None


def find_price(client: StripeClient, lookup_key: str) -> dict[str, Any] | None:
    page = client.get("/v1/prices", {"lookup_keys": [lookup_key], "active": True, "limit": 1})
    data = page.get("data") or []
    return data[0] if data else None


def setup(client: StripeClient, config: CatalogConfig) -> SetupResult:
    created: list[str] = []
    notes: list[str] = []
    # The meter sums the cost of usage in millionths of the main unit (billing/job.py), so
    # the price is fixed, 0.0001 cents per unit, whatever the price table says per model.
    unit = MICRO_UNIT_AMOUNT_DECIMAL

    meter = find_meter(client, config.meter_event_name)
    if meter is None:
        meter = client.send(
            post_request(
                "/v1/billing/meters",
                {
                    "display_name": "ccproxy usage (millionths of the currency unit)",
                    "event_name": config.meter_event_name,
                    "default_aggregation": {"formula": "sum"},
                    "customer_mapping": {"type": "by_id", "event_payload_key": CUSTOMER_KEY},
                    "value_settings": {"event_payload_key": VALUE_KEY},
                },
                f"ccproxy-setup-meter-{config.meter_event_name}",
            )
        )
        created.append("meter")
    elif (meter.get("default_aggregation") or {}).get("formula") != "sum":
        notes.append(f"meter {meter['id']} does not sum its events; billing would be wrong")

    # A fixed product id makes "find or create" one GET, with no search.
    product_id = config.price_lookup_key
    try:
        client.get(f"/v1/products/{product_id}")
    except StripeError as exc:
        if exc.status != 404:
            raise
        client.send(
            post_request(
                "/v1/products",
                {"id": product_id, "name": "ccproxy usage"},
                f"ccproxy-setup-product-{product_id}",
            )
        )
        created.append("product")

    price = find_price(client, config.price_lookup_key)
    if price is not None and _price_matches(price, meter["id"], unit, config.currency):
        price_id = str(price["id"])
    else:
        if price is not None:
            notes.append(
                f"price {price['id']} differs (amount, currency or meter); a new price takes "
                f"the lookup key, and subscriptions on the old one keep it until moved"
            )
        new = client.send(
            post_request(
                "/v1/prices",
                {
                    "product": product_id,
                    "currency": config.currency,
                    "unit_amount_decimal": unit,
                    "billing_scheme": "per_unit",
                    "recurring": {
                        "interval": "month",
                        "usage_type": "metered",
                        "meter": meter["id"],
                    },
                    "lookup_key": config.price_lookup_key,
                    "transfer_lookup_key": True,
                },
                f"ccproxy-setup-price-{config.price_lookup_key}",
            )
        )
        price_id = str(new["id"])
        created.append("price")
    return SetupResult(str(meter["id"]), product_id, price_id, unit, tuple(created), tuple(notes))


# Subscription states in which Stripe invoices metered usage.
ACTIVE_SUBSCRIPTION_STATES = frozenset({"active", "trialing", "past_due"})


def has_active_subscription(client: StripeClient, customer_id: str, price_id: str) -> bool:
    """Whether the customer has a subscription to the metered price that Stripe would invoice
    usage under. Stripe lists all but canceled subscriptions by default; the status is checked
    here because `incomplete`, `unpaid` and `paused` ones invoice nothing."""
    page = client.get("/v1/subscriptions", {"customer": customer_id, "price": price_id, "limit": 100})
    return any(s.get("status") in ACTIVE_SUBSCRIPTION_STATES for s in page.get("data") or [])


def _price_matches(price: dict[str, Any], meter_id: str, unit: str, currency: str) -> bool:
    recurring = price.get("recurring") or {}
    try:
        same_amount = Decimal(str(price.get("unit_amount_decimal"))) == Decimal(unit)
    except ArithmeticError:
        same_amount = False
    return (
        same_amount
        and price.get("currency") == currency
        and recurring.get("usage_type") == "metered"
        and recurring.get("meter") == meter_id
    )


def create_customer(
    client: StripeClient, ledger: BillingLedger, account: BillingAccount, email: str | None = None
) -> str:
    """The account's Stripe customer: the one it has, or a new one stored on the account."""
    if account.stripe_customer_id:
        return account.stripe_customer_id
    params: dict[str, Any] = {
        "name": account.name,
        "metadata": {"ccproxy_account_id": account.id},
    }
    if email:
        params["email"] = email
    customer = client.send(post_request("/v1/customers", params, f"ccproxy-customer-{account.id}"))
    customer_id = str(customer["id"])
    ledger.set_customer(account.name, customer_id)
    return customer_id


def subscribe(client: StripeClient, customer_id: str, lookup_key: str) -> tuple[str, bool]:
    """Subscribe the customer to the metered price (meters mode bills nothing without it).
    Returns the subscription id and whether it was created now."""
    price = find_price(client, lookup_key)
    if price is None:
        raise LookupError(f"no active price with lookup key {lookup_key!r}: run setup first")
    existing = client.get(
        "/v1/subscriptions",
        {"customer": customer_id, "price": price["id"], "status": "active", "limit": 1},
    )
    if existing.get("data"):
        return str(existing["data"][0]["id"]), False
    subscription = client.send(
        post_request(
            "/v1/subscriptions",
            {"customer": customer_id, "items": [{"price": price["id"]}]},
            f"ccproxy-subscribe-{customer_id}-{price['id']}",
        )
    )
    return str(subscription["id"]), True
