"""`invoice-items` mode: end to end against localstripe (a stateful fake Stripe server), and
its crash and refusal paths against the recording fake (localstripe ignores idempotency keys)."""

from __future__ import annotations

from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import pytest

from billing.catalog import create_customer
from billing.job import amount_minor
from billing.ledger import BillingLedger
from billing.runner import run
from tests.billing.fake_stripe import FakeStripe
from tests.billing.helpers import NOW, PRICE, PRICES, at, client, config, seed
from tests.usage.conftest import Backend
from tests.usage.helpers import make_event

INVOICES = config("invoice-items")


class Crash(BaseException):
    pass


def _get(url: str, path: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{url}{path}", params=params, auth=("sk_test_local", ""), timeout=5)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def test_localstripe_invoice_total_is_tokens_after_times_price(
    db: Backend, ledger: BillingLedger, localstripe_url: str
) -> None:
    usage = {"acme": {0: 1_234_567, 1: 2_000_000, 3: 999}, "beta": {2: 40_001}}
    for name, hours in usage.items():
        seed(db.store, name, hours)
    seed(db.store, "nocustomer", {0: 5_000_000})
    with client(localstripe_url) as stripe:
        customers = {
            name: create_customer(stripe, ledger, ledger.account(name))  # type: ignore[arg-type]
            for name in usage
        }
        report = run(ledger, stripe, INVOICES, NOW)
    assert report.ok and [o.status for o in report.outcomes] == ["sent", "sent"]
    assert [(s.account_name, s.reason) for s in report.plan.skipped] == [
        ("nocustomer", "no-customer")
    ]

    for name, hours in usage.items():
        tokens = sum(hours.values())
        (invoice,) = _get(localstripe_url, "/v1/invoices", customer=customers[name])["data"]
        assert invoice["status"] == "open"  # finalized
        assert invoice["total"] == amount_minor(tokens, PRICE)
        assert invoice["currency"] == "usd"
        (line,) = invoice["lines"]["data"]
        assert line["amount"] == invoice["total"]
        assert f"{tokens:,} input tokens" in line["description"]
    # 3,235,566 tokens x 2.50 USD per million = 808.8915 cents -> 809
    assert amount_minor(sum(usage["acme"].values()), PRICE) == 809
    records = {r.batch.account_id: r for r in ledger.batches()}
    assert all(r.state == "sent" and r.batch.stripe_invoice_id for r in records.values())

    # A second run creates nothing new.
    with client(localstripe_url) as stripe:
        again = run(ledger, stripe, INVOICES, NOW + timedelta(minutes=30))
    assert again.ok and again.outcomes == []
    for name in usage:
        assert len(_get(localstripe_url, "/v1/invoices", customer=customers[name])["data"]) == 1
        assert _get(localstripe_url, "/v1/invoiceitems", customer=customers[name])["data"] == []


@pytest.mark.parametrize(
    ("crash_in", "keys_expired"), [("record", False), ("record", True), ("mark_sent", True)]
)
def test_a_crash_after_a_stripe_call_resumes_without_a_duplicate(
    db: Backend,
    ledger: BillingLedger,
    fake_stripe: FakeStripe,
    monkeypatch: pytest.MonkeyPatch,
    crash_in: str,
    keys_expired: bool,
) -> None:
    seed(db.store, "acme", {0: 1_000_000, 1: 500_000})
    customer = fake_stripe.add({"id": "cus_A", "object": "customer"})
    ledger.set_customer("acme", customer["id"])

    def crash(self: BillingLedger, *args: Any, **kwargs: Any) -> None:
        raise Crash

    # "record" dies right after the invoice item exists; "mark_sent" after finalizing.
    monkeypatch.setattr(BillingLedger, crash_in, crash)
    with client(fake_stripe.url) as stripe, pytest.raises(Crash):
        run(ledger, stripe, INVOICES, NOW)
    monkeypatch.undo()
    if keys_expired:  # resumed after Stripe forgot the keys: the ledger's lookups must do
        fake_stripe.expire_idempotency_keys()

    fresh = BillingLedger(db.new_store())
    with client(fake_stripe.url) as stripe:
        report = run(fresh, stripe, INVOICES, NOW + timedelta(minutes=10))
    assert report.ok and [(o.status, o.resumed) for o in report.outcomes] == [("sent", True)]
    (item,) = fake_stripe.objects("invoiceitem")
    (invoice,) = fake_stripe.objects("invoice")
    assert len(fake_stripe.calls("POST", "/v1/invoiceitems")) == 1  # found, not re-created
    assert item["amount"] == 375 == invoice["total"] and invoice["status"] == "open"
    (record,) = fresh.batches()
    assert record.state == "sent"
    assert (record.batch.stripe_object_id, record.batch.stripe_invoice_id) == (
        item["id"],
        invoice["id"],
    )
    with client(fake_stripe.url) as stripe:
        assert run(fresh, stripe, INVOICES, NOW + timedelta(minutes=20)).outcomes == []
    assert len(fake_stripe.objects("invoiceitem")) == 1


def test_a_refused_batch_frees_its_hours_for_a_later_run(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    seed(db.store, "acme", {0: 1_000_000})
    ledger.set_customer("acme", "cus_deleted")  # Stripe does not know it
    with client(fake_stripe.url) as stripe:
        report = run(ledger, stripe, INVOICES, NOW)
    assert not report.ok
    (outcome,) = report.outcomes
    assert outcome.status == "rejected" and "No such customer" in (outcome.error or "")
    assert ledger.pending() == [] and len(ledger.unbilled(NOW - timedelta(days=1), NOW)) == 1

    fake_stripe.add({"id": "cus_A", "object": "customer"})
    ledger.set_customer("acme", "cus_A")
    with client(fake_stripe.url) as stripe:
        fixed = run(ledger, stripe, INVOICES, NOW + timedelta(hours=1))
    assert fixed.ok and [o.status for o in fixed.outcomes] == ["sent"]
    (invoice,) = fake_stripe.objects("invoice")
    assert invoice["customer"] == "cus_A" and invoice["total"] == 250


def test_a_failed_invoice_step_is_resumed_and_holds_back_new_batches(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    a = seed(db.store, "acme", {0: 1_000_000})
    fake_stripe.add({"id": "cus_A", "object": "customer"})
    ledger.set_customer("acme", "cus_A")
    fake_stripe.fail(503, times=10, path="/v1/invoices")
    with client(fake_stripe.url, max_retries=1) as stripe:
        report = run(ledger, stripe, INVOICES, NOW)
    assert [o.status for o in report.outcomes] == ["failed"]
    (pending,) = ledger.pending()
    assert pending.stripe_object_id and pending.stripe_invoice_id is None  # the item exists

    # More usage arrives; while the batch is pending, the account gets no second batch.
    seed(db.store, "acme", {4: 2_000_000})
    with client(fake_stripe.url, max_retries=1) as stripe:
        blocked = run(ledger, stripe, INVOICES, NOW + timedelta(hours=1))
    assert [s.reason for s in blocked.plan.skipped] == ["pending-batch"]
    fake_stripe.faults.clear()
    with client(fake_stripe.url) as stripe:
        resumed = run(ledger, stripe, INVOICES, NOW + timedelta(hours=2))
    assert [(o.status, o.resumed, o.batch.quantity) for o in resumed.outcomes] == [
        ("sent", True, 1_000_000),
        ("sent", False, 2_000_000),
    ]
    totals = sorted(i["total"] for i in fake_stripe.objects("invoice"))
    assert totals == [250, 500]
    assert {r.batch.account_id for r in ledger.batches()} == {a}


def test_localstripe_a_mixed_month_is_invoiced_line_by_line_from_the_price_table(
    db: Backend, ledger: BillingLedger, localstripe_url: str
) -> None:
    """Several models with completions, a cached-input row, a cut stream (prompt and the
    completion tokens seen) and /v1/compress calls, over a month: every invoice line is the
    price table applied to the rows."""
    account = db.store.ensure_account("mixed")
    month = at(0) - timedelta(days=20)

    def event(day: int, model: str, **fields: Any) -> Any:
        return make_event(account, created_at=month + timedelta(days=day), model=model, **fields)

    events = [
        event(0, "gpt-4o-2024-08-06", tokens_after=1_200_000, completion_tokens=300_000),
        event(1, "gpt-4o", tokens_after=800_000, cached_tokens=600_000, completion_tokens=50_000),
        event(2, "o1", tokens_after=90_000, completion_tokens=120_000),
        event(3, "gpt-4o-mini", tokens_after=2_000_000, completion_tokens=0, status=200),
        # A stream cut after it started: the prompt and the completion tokens seen.
        event(4, "o1", tokens_after=10_000, completion_tokens=777, stream=True, status=499),
        event(5, "", kind="compress", tokens_before=3_000_000, tokens_after=600_000,
              completion_tokens=0),
        event(6, "gpt-4o", kind="compress", tokens_before=1_000_000, tokens_after=200_000,
              completion_tokens=0),
    ]
    db.store.write_events(events)
    with client(localstripe_url) as stripe:
        customer = create_customer(stripe, ledger, ledger.account("mixed"))  # type: ignore[arg-type]
        report = run(ledger, stripe, INVOICES, NOW, since=month)
    assert report.ok and [o.status for o in report.outcomes] == ["sent"]

    # The expected lines, computed here from the rows and the table, independently of the job.
    def cents(tokens: int, price: str) -> int:
        exact = Decimal(tokens) * Decimal(price) / 1_000_000 * 100
        return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))

    gpt4o, o1, default = PRICES.models["gpt-4o"], PRICES.models["o1"], PRICES.default
    expected = {
        # (model, class): (tokens, cents)
        # day 1: 800k prompt tokens after compression, 600k of them cached
        ("gpt-4o", "input"): (200_000, cents(200_000, str(gpt4o.input))),
        ("gpt-4o", "cached_input"): (600_000, cents(600_000, str(gpt4o.cached_input))),
        ("gpt-4o", "output"): (50_000, cents(50_000, str(gpt4o.output))),
        ("gpt-4o-2024-08-06", "input"): (1_200_000, cents(1_200_000, str(gpt4o.input))),
        ("gpt-4o-2024-08-06", "output"): (300_000, cents(300_000, str(gpt4o.output))),
        # o1: day 2 and the stream cut on day 4 (its prompt and the completion tokens seen)
        ("o1", "input"): (100_000, cents(100_000, str(o1.input))),
        ("o1", "output"): (120_777, cents(120_777, str(o1.output))),
        ("gpt-4o-mini", "input"): (2_000_000, cents(2_000_000, str(default.input))),
        # both /v1/compress calls, one line whatever their model: tokens scored
        ("compress", "compress"): (4_000_000, cents(4_000_000, str(PRICES.compress))),
    }

    (invoice,) = _get(localstripe_url, "/v1/invoices", customer=customer)["data"]
    assert invoice["status"] == "open"
    lines = invoice["lines"]["data"]
    items = _get(localstripe_url, "/v1/invoiceitems", customer=customer)["data"]
    assert items == [] or all(i.get("invoice") for i in items)  # all taken by the invoice
    got = {}
    (record,) = ledger.batches()
    by_item = {x.stripe_object_id: x for x in record.batch.priced}
    for line in lines:
        priced = by_item[line.get("invoice_item") or line["id"]]
        key = ("compress" if priced.kind == "compress" else priced.model, priced.token_class)
        got[key] = (priced.tokens, line["amount"])
        assert f"{priced.tokens:,}" in line["description"]
    assert got == expected
    assert invoice["total"] == sum(c for _, c in expected.values()) == record.batch.amount_minor
