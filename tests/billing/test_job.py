"""Planning and money maths: pure, no database, no network."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from billing.job import (
    BillingAccount,
    PlanConfig,
    Unbilled,
    Usage,
    amount_minor,
    closed_before,
    finalize_request,
    invoice_batch_id,
    invoice_item_request,
    invoice_lines,
    invoice_request,
    meter_event_request,
    meter_identifier,
    plan,
    unit_amount_decimal,
)
from tests.billing.helpers import PRICES, at

METERS = PlanConfig("meters", PRICES, "usd", "ccproxy_usage_micro")
INVOICES = PlanConfig("invoice-items", PRICES, "usd", "ccproxy_usage_micro")
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


def _u(
    account: str,
    hour: int,
    seq: int,
    tokens_after: int,
    model: str = "gpt-4o-mini",
    kind: str = "chat",
    cached: int = 0,
    completion: int = 0,
    before: int = 0,
) -> Unbilled:
    return Unbilled(
        account, at(hour), seq, model, kind, Usage(before, tokens_after, cached, completion)
    )


def test_meters_plan_one_batch_per_account_hour_and_reports_the_rest() -> None:
    rows = [
        _u("acct_a", 1, 0, 700),
        _u("acct_a", 0, 0, 500),
        _u("acct_a", 0, 0, 100, model="gpt-4o", completion=10),  # same hour: same event
        _u("acct_a", 2, 1, 0),  # nothing new: ignored
        _u("acct_b", 0, 0, 300),
        _u("acct_zombie", 0, 0, 9),
    ]
    result = plan(rows, ACCOUNTS, METERS)
    # 500 x 2.50 + 100 x 5.00 + 10 x 15.00 = 1,900 millionths; 700 x 2.50 = 1,750.
    assert [(b.period_start, b.tokens, b.quantity, b.amount_minor) for b in result.batches] == [
        (at(0), 610, 1900, None),
        (at(1), 700, 1750, None),
    ]
    assert all(b.period_end - b.period_start == timedelta(hours=1) for b in result.batches)
    assert result.batches[0].batch_id == meter_identifier("acct_a", at(0), 0)
    assert {(s.account_id, s.reason, s.hours, s.tokens) for s in result.skipped} == {
        ("acct_b", "no-customer", 1, 300),
        ("acct_zombie", "unknown-account", 1, 9),
    }


def test_meters_skip_customers_without_a_subscription() -> None:
    rows = [_u("acct_a", 0, 0, 5_000)]
    result = plan(rows, ACCOUNTS, METERS, unsubscribed=frozenset({"acct_a"}))
    assert result.batches == ()
    assert [(s.account_id, s.reason) for s in result.skipped] == [("acct_a", "no-subscription")]
    # Invoice items need no subscription.
    assert len(plan(rows, ACCOUNTS, INVOICES, unsubscribed=frozenset({"acct_a"})).batches) == 1


def test_invoice_items_plan_one_line_per_model_and_token_class() -> None:
    rows = [
        _u("acct_a", 0, 0, 1_000_000, cached=400_000, completion=50_000),
        _u("acct_a", 1, 0, 2_000_000, model="gpt-4o-2024-08-06", completion=100_000),
        _u("acct_a", 1, 0, 0, kind="compress", before=3_000_000, model=""),
        _u("acct_a", 2, 0, 1_333, model="unknown-model"),
    ]
    (batch,) = plan(rows, ACCOUNTS, INVOICES).batches
    lines = [
        (x.kind, x.model, x.token_class, x.priced_as, x.tokens, x.amount_minor)
        for x in batch.priced
    ]
    assert lines == [
        ("chat", "gpt-4o-2024-08-06", "input", "gpt-4o", 2_000_000, 1000),  # x 5.00
        ("chat", "gpt-4o-2024-08-06", "output", "gpt-4o", 100_000, 150),  # x 15.00
        ("chat", "gpt-4o-mini", "input", "default", 600_000, 150),  # x 2.50
        ("chat", "gpt-4o-mini", "cached_input", "default", 400_000, 50),  # x 1.25
        ("chat", "gpt-4o-mini", "output", "default", 50_000, 50),  # x 10.00
        ("chat", "unknown-model", "input", "default", 1_333, 0),  # 0.33 cents: rounds to 0
        ("compress", "", "compress", "compress", 3_000_000, 120),  # x 0.40
    ]
    assert batch.amount_minor == 1520 == sum(x.amount_minor or 0 for x in batch.priced)
    assert [x.line_no for x in invoice_lines(batch)] == [0, 1, 2, 3, 4, 6]
    assert (batch.period_start, batch.period_end) == (at(0), at(3))
    assert batch.batch_id == invoice_batch_id("acct_a", batch.lines)
    again = plan(list(reversed(rows)), ACCOUNTS, INVOICES).batches[0]
    assert again.batch_id == batch.batch_id and again.priced == batch.priced
    more = plan([*rows, _u("acct_a", 0, 1, 5)], ACCOUNTS, INVOICES).batches[0]
    assert more.batch_id != batch.batch_id


def test_invoice_items_round_each_line_once_over_the_batch() -> None:
    rows = [_u("acct_a", h, 0, 1_333) for h in range(3)]
    (batch,) = plan(rows, ACCOUNTS, INVOICES).batches
    # One line over the batch: 3,999 x 2.50 per million = 0.99975 cents -> 1 (not 3 x 0).
    assert [(x.tokens, x.amount_minor) for x in batch.priced] == [(3_999, 1)]


def test_invoice_items_wait_below_one_cent_and_behind_a_pending_batch() -> None:
    tiny = [_u("acct_a", 0, 0, 1_000)]
    assert plan(tiny, ACCOUNTS, INVOICES).batches == ()
    assert plan(tiny, ACCOUNTS, INVOICES).skipped[0].reason == "under-one-cent"
    enough = [_u("acct_a", 0, 0, 10_000)]
    busy = plan(enough, ACCOUNTS, INVOICES, busy_accounts=frozenset({"acct_a"}))
    assert busy.batches == () and busy.skipped[0].reason == "pending-batch"
    # Meter events of different hours never interfere: a pending one does not hold others.
    assert len(plan(enough, ACCOUNTS, METERS, busy_accounts=frozenset({"acct_a"})).batches) == 1


def test_meter_event_request_shape_and_stable_key() -> None:
    (batch,) = plan([_u("acct_a", 0, 0, 4_321)], ACCOUNTS, METERS).batches
    request = meter_event_request(batch)
    assert (request.method, request.path) == ("POST", "/v1/billing/meter_events")
    assert dict(request.params) == {
        "event_name": "ccproxy_usage_micro",
        "identifier": "ccproxy-acct_a-20240501T10-0",
        "timestamp": int(at(0).timestamp()),
        # 4,321 x 2.50 per million = 10,802.5 millionths, rounded half-up
        "payload": {"stripe_customer_id": "cus_A", "value": "10803"},
    }
    assert request.idempotency_key == meter_event_request(batch).idempotency_key
    assert request.idempotency_key and request.idempotency_key.startswith(batch.batch_id)


def test_invoice_requests_shape() -> None:
    rows = [_u("acct_a", 0, 0, 1_000_000), _u("acct_a", 1, 0, 200_000, completion=100_000)]
    (batch,) = plan(rows, ACCOUNTS, INVOICES).batches
    first, second = (invoice_item_request(batch, x) for x in invoice_lines(batch))
    assert first.path == "/v1/invoiceitems"
    assert first.params["amount"] == 300 and first.params["currency"] == "usd"
    assert second.params["amount"] == 100
    assert first.params["customer"] == "cus_A"
    assert first.params["period"] == {
        "start": int(at(0).timestamp()),
        "end": int(at(2).timestamp()),
    }
    assert first.params["metadata"]["tokens"] == "1200000"
    assert first.params["metadata"]["ccproxy_line"] == "0"
    assert "gpt-4o-mini: 1,200,000 input tokens at 2.5 USD/M" in first.params["description"]
    assert "100,000 output tokens at 10 USD/M" in second.params["description"]
    invoice = invoice_request(batch)
    assert invoice.params["pending_invoice_items_behavior"] == "include"
    assert invoice.params["auto_advance"] is False
    final = finalize_request(batch, "in_1")
    assert final.path == "/v1/invoices/in_1/finalize"
    keys = {first.idempotency_key, second.idempotency_key}
    keys |= {invoice.idempotency_key, final.idempotency_key}
    assert len(keys) == 4
