"""Planning and money maths: pure, no database, no network."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from billing.job import (
    BillingAccount,
    PlanConfig,
    Unbilled,
    amount_minor,
    closed_before,
    finalize_request,
    invoice_batch_id,
    invoice_item_request,
    invoice_request,
    meter_event_request,
    meter_identifier,
    plan,
    unit_amount_decimal,
)
from billing.stripe_client import encode
from tests.billing.helpers import PRICE, at

METERS = PlanConfig("meters", PRICE, "usd", "ccproxy_tokens_after")
INVOICES = PlanConfig("invoice-items", PRICE, "usd", "ccproxy_tokens_after")
ACCOUNTS = {
    "acct_a": BillingAccount("acct_a", "acme", "cus_A"),
    "acct_b": BillingAccount("acct_b", "beta", None),
}


@pytest.mark.parametrize(
    ("tokens", "price", "cents"),
    [
        (1_000_000, "2.50", 250),
        (0, "2.50", 0),
        (1_999, "2.50", 0),  # 0.49975 cents
        (2_000, "2.50", 1),  # 0.5 cents: half-up
        (123_456_789, "2.50", 30864),  # 30864.19725 cents
        (10**12, "0.07", 7_000_000),
        (3, "1000000", 300),
    ],
)
def test_amount_is_rounded_half_up_to_the_cent_once(tokens: int, price: str, cents: int) -> None:
    assert amount_minor(tokens, Decimal(price)) == cents


def test_unit_amount_decimal_is_cents_per_token_without_exponent() -> None:
    assert unit_amount_decimal(Decimal("2.50")) == "0.00025"
    assert unit_amount_decimal(Decimal("1")) == "0.0001"
    assert unit_amount_decimal(Decimal("1000000")) == "100"
    assert unit_amount_decimal(Decimal("0.000001")) == "0.0000000001"
    with pytest.raises(ValueError, match="12 decimal places"):
        unit_amount_decimal(Decimal("0.0000000001"))


def test_an_hour_closes_after_its_end_plus_the_delay() -> None:
    ten = datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    # The 09:00 hour ends at 10:00 and closes at 10:10.
    assert closed_before(ten + timedelta(minutes=9, seconds=59), 600) == ten - timedelta(hours=1)
    assert closed_before(ten + timedelta(minutes=10), 600) == ten
    assert closed_before(ten, 0) == ten


def test_meter_identifiers_are_stable_and_distinct() -> None:
    one = meter_identifier("acct_a", at(0), 0)
    assert one == meter_identifier("acct_a", at(0) + timedelta(minutes=0), 0)
    assert one == "ccproxy-acct_a-20240501T10-0"
    others = {
        meter_identifier("acct_b", at(0), 0),
        meter_identifier("acct_a", at(1), 0),
        meter_identifier("acct_a", at(0), 1),
    }
    assert one not in others and len(others) == 3
    assert len(meter_identifier("x" * 500, at(0), 12)) <= 100


def test_meters_plan_one_batch_per_account_hour_and_reports_the_rest() -> None:
    rows = [
        Unbilled("acct_a", at(1), 0, 700),
        Unbilled("acct_a", at(0), 0, 500),
        Unbilled("acct_a", at(2), 1, 0),  # nothing new: ignored
        Unbilled("acct_b", at(0), 0, 300),
        Unbilled("acct_zombie", at(0), 0, 9),
    ]
    result = plan(rows, ACCOUNTS, METERS)
    assert [(b.period_start, b.quantity, b.amount_minor) for b in result.batches] == [
        (at(0), 500, None),
        (at(1), 700, None),
    ]
    assert all(b.period_end - b.period_start == timedelta(hours=1) for b in result.batches)
    assert result.batches[0].batch_id == meter_identifier("acct_a", at(0), 0)
    assert {(s.account_id, s.reason, s.hours, s.tokens_after) for s in result.skipped} == {
        ("acct_b", "no-customer", 1, 300),
        ("acct_zombie", "unknown-account", 1, 9),
    }


def test_invoice_items_plan_one_batch_per_account_priced_once() -> None:
    rows = [Unbilled("acct_a", at(h), 0, 1_333) for h in range(3)]
    (batch,) = plan(rows, ACCOUNTS, INVOICES).batches
    assert batch.quantity == 3_999
    # Rounded once over the batch (0.99975 -> 1 cent), not per hour (3 x 0.333 -> 0).
    assert batch.amount_minor == 1
    assert (batch.period_start, batch.period_end) == (at(0), at(3))
    assert batch.batch_id == invoice_batch_id("acct_a", batch.lines)
    again = plan(list(reversed(rows)), ACCOUNTS, INVOICES).batches[0]
    assert again.batch_id == batch.batch_id
    more = plan([*rows, Unbilled("acct_a", at(0), 1, 5)], ACCOUNTS, INVOICES).batches[0]
    assert more.batch_id != batch.batch_id


def test_invoice_items_wait_below_one_cent_and_behind_a_pending_batch() -> None:
    tiny = [Unbilled("acct_a", at(0), 0, 1_000)]
    assert plan(tiny, ACCOUNTS, INVOICES).batches == ()
    assert plan(tiny, ACCOUNTS, INVOICES).skipped[0].reason == "under-one-cent"
    enough = [Unbilled("acct_a", at(0), 0, 10_000)]
    busy = plan(enough, ACCOUNTS, INVOICES, busy_accounts=frozenset({"acct_a"}))
    assert busy.batches == () and busy.skipped[0].reason == "pending-batch"
    # Meter events of different hours never interfere: a pending one does not hold others.
    assert len(plan(enough, ACCOUNTS, METERS, busy_accounts=frozenset({"acct_a"})).batches) == 1


def test_meter_event_request_shape_and_stable_key() -> None:
    (batch,) = plan([Unbilled("acct_a", at(0), 0, 4_321)], ACCOUNTS, METERS).batches
    request = meter_event_request(batch)
    assert (request.method, request.path) == ("POST", "/v1/billing/meter_events")
    assert dict(request.params) == {
        "event_name": "ccproxy_tokens_after",
        "identifier": "ccproxy-acct_a-20240501T10-0",
        "timestamp": int(at(0).timestamp()),
        "payload": {"stripe_customer_id": "cus_A", "value": "4321"},
    }
    assert request.idempotency_key == meter_event_request(batch).idempotency_key
    assert request.idempotency_key and request.idempotency_key.startswith(batch.batch_id)


def test_invoice_requests_shape() -> None:
    rows = [Unbilled("acct_a", at(0), 0, 1_000_000), Unbilled("acct_a", at(1), 0, 200_000)]
    (batch,) = plan(rows, ACCOUNTS, INVOICES).batches
    item = invoice_item_request(batch)
    assert item.path == "/v1/invoiceitems"
    assert item.params["amount"] == 300 and item.params["currency"] == "usd"
    assert item.params["customer"] == "cus_A"
    assert item.params["period"] == {"start": int(at(0).timestamp()), "end": int(at(2).timestamp())}
    assert item.params["metadata"]["tokens_after"] == "1200000"
    assert "1,200,000 tokens" in item.params["description"]
    invoice = invoice_request(batch)
    assert invoice.params["pending_invoice_items_behavior"] == "include"
    assert invoice.params["auto_advance"] is False
    final = finalize_request(batch, "in_1")
    assert final.path == "/v1/invoices/in_1/finalize"
    keys = {item.idempotency_key, invoice.idempotency_key, final.idempotency_key}
    assert len(keys) == 3


def test_stripe_form_encoding() -> None:
    params = {
        "a": 1,
        "payload": {"value": "2", "nested": {"x": True}},
        "items": [{"price": "p1"}, {"price": "p2"}],
        "keys": ["k"],
        "skip": None,
        "flag": False,
    }
    assert encode(params) == [
        ("a", "1"),
        ("payload[value]", "2"),
        ("payload[nested][x]", "true"),
        ("items[0][price]", "p1"),
        ("items[1][price]", "p2"),
        ("keys[0]", "k"),
        ("flag", "false"),
    ]
