"""`meters` mode end to end against the recording fake of Stripe, on SQLite and Postgres:
request shapes, reruns, retries, resumption after failures and after a crash."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from billing import runner
from billing.job import meter_identifier
from billing.ledger import BillingLedger
from billing.runner import run
from tests.billing.fake_stripe import FakeStripe
from tests.billing.helpers import NOW, Sleeps, at, client, config, seed, subscribe_in_fake
from tests.usage.conftest import Backend
from tests.usage.helpers import make_event

EVENTS = "/v1/billing/meter_events"


class Crash(BaseException):
    """The process dies: nothing below the raise runs, no handler catches it."""


def _seed_two(db: Backend, ledger: BillingLedger, fake: FakeStripe) -> tuple[str, str]:
    """gpt-4o-mini (the table's default row, 2.50 per million input tokens), prompts only:
    a meter event's value is tokens x 2.5 millionths."""
    a = seed(db.store, "acme", {0: 900, 1: 1200, 4: 50})  # hour 4 is still open at NOW
    b = seed(db.store, "beta", {2: 333})
    ledger.set_customer("acme", "cus_A")
    ledger.set_customer("beta", "cus_B")
    subscribe_in_fake(fake, "cus_A", "cus_B")
    return a, b


def test_one_meter_event_per_closed_account_hour_and_a_rerun_sends_nothing(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    a, b = _seed_two(db, ledger, fake_stripe)
    with client(fake_stripe.url) as stripe:
        report = run(ledger, stripe, config(), NOW)
    assert report.ok and [o.status for o in report.outcomes] == ["sent"] * 3
    sent = {r.params["identifier"]: r for r in fake_stripe.calls("POST", EVENTS)}
    assert set(sent) == {
        meter_identifier(a, at(0), 0),
        meter_identifier(a, at(1), 0),
        meter_identifier(b, at(2), 0),
    }
    one = sent[meter_identifier(a, at(1), 0)]
    assert one.params == {
        "event_name": "ccproxy_usage_micro",
        "identifier": meter_identifier(a, at(1), 0),
        "timestamp": str(int(at(1).timestamp())),
        # 1,200 tokens x 2.50 per million = 0.003 USD = 3,000 millionths
        "payload": {"stripe_customer_id": "cus_A", "value": "3000"},
    }
    assert one.idempotency_key and one.idempotency_key.startswith(one.params["identifier"])
    records = ledger.batches()
    assert {r.state for r in records} == {"sent"}
    assert all(r.batch.stripe_object_id == r.batch.batch_id for r in records)

    with client(fake_stripe.url) as stripe:
        again = run(ledger, stripe, config(), NOW + timedelta(minutes=20))
    assert again.ok and again.outcomes == [] and again.plan.batches == ()
    assert len(fake_stripe.calls("POST", EVENTS)) == 3


def test_the_next_hour_and_late_usage_are_billed_by_later_runs(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    a, _ = _seed_two(db, ledger, fake_stripe)
    with client(fake_stripe.url) as stripe:
        run(ledger, stripe, config(), NOW)
        # Usage for hour 0 that reached the database late, and hour 4 closing.
        db.store.write_events(
            [
                make_event(
                    a, created_at=at(0) + timedelta(minutes=30), tokens_after=7, completion_tokens=25
                )
            ]
        )
        report = run(ledger, stripe, config(), NOW + timedelta(hours=1))
    assert [(o.batch.batch_id, o.batch.tokens, o.batch.quantity) for o in report.outcomes] == [
        # 7 x 2.50 + 25 x 10.00 per million = 267.5 millionths, rounded half-up once
        (meter_identifier(a, at(0), 1), 32, 268),
        (meter_identifier(a, at(4), 0), 50, 125),
    ]
    totals: dict[tuple[str, int], int] = {}
    for event in fake_stripe.meter_events.values():
        key = (event["payload"]["stripe_customer_id"], event["timestamp"])
        totals[key] = totals.get(key, 0) + int(event["payload"]["value"])
    assert db.store.hourly(a, at(0), at(1))[0].tokens_after == 907
    assert totals[("cus_A", int(at(0).timestamp()))] == 2250 + 268


def test_a_429_is_retried_with_the_same_identifier_and_key(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    seed(db.store, "acme", {0: 900})
    ledger.set_customer("acme", "cus_A")
    subscribe_in_fake(fake_stripe, "cus_A")
    fake_stripe.fail(429, retry_after="1", path=EVENTS)
    sleeps = Sleeps()
    with client(fake_stripe.url, sleeps) as stripe:
        report = run(ledger, stripe, config(), NOW)
    assert report.ok
    calls = fake_stripe.calls("POST", EVENTS)
    assert [c.status for c in calls] == [429, 200]
    assert calls[0].pairs == calls[1].pairs
    assert calls[0].idempotency_key == calls[1].idempotency_key
    assert sleeps == [1.0]
    assert len(fake_stripe.meter_events) == 1


def test_a_500_that_outlasts_the_retries_is_reported_and_resumed_next_run(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    _seed_two(db, ledger, fake_stripe)
    fake_stripe.fail(500, times=4, path=EVENTS)  # 1 try + 3 retries, all on the first event
    with client(fake_stripe.url, max_retries=3) as stripe:
        report = run(ledger, stripe, config(), NOW)
    assert not report.ok
    first = report.plan.batches[0].batch_id
    statuses = {o.batch.batch_id: o.status for o in report.outcomes}
    assert statuses[first] == "failed" and list(statuses.values()).count("sent") == 2
    assert "HTTP 500" in (report.outcomes[0].error or "")
    (pending,) = ledger.batches(state="pending")
    assert pending.batch.batch_id == first and "HTTP 500" in (pending.last_error or "")

    with client(fake_stripe.url) as stripe:
        resumed = run(ledger, stripe, config(), NOW + timedelta(minutes=5))
    assert resumed.ok
    assert [(o.batch.batch_id, o.status, o.resumed) for o in resumed.outcomes] == [
        (first, "sent", True)
    ]
    calls = [c for c in fake_stripe.calls("POST", EVENTS) if c.params["identifier"] == first]
    assert len(calls) == 5 and len({c.idempotency_key for c in calls}) == 1
    assert len(fake_stripe.meter_events) == 3
    assert {r.state for r in ledger.batches()} == {"sent"}


@pytest.mark.parametrize("keys_expired", [False, True])
def test_a_crash_between_the_stripe_call_and_the_ledger_write_bills_once(
    db: Backend,
    ledger: BillingLedger,
    fake_stripe: FakeStripe,
    monkeypatch: pytest.MonkeyPatch,
    keys_expired: bool,
) -> None:
    _seed_two(db, ledger, fake_stripe)
    real_mark_sent = BillingLedger.mark_sent
    calls = 0

    def crash_on_second(self: BillingLedger, batch_id: str, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Crash
        real_mark_sent(self, batch_id, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(BillingLedger, "mark_sent", crash_on_second)
    with client(fake_stripe.url) as stripe, pytest.raises(Crash):
        run(ledger, stripe, config(), NOW)
    monkeypatch.setattr(BillingLedger, "mark_sent", real_mark_sent)
    assert len(fake_stripe.meter_events) == 2  # Stripe got the second event; the ledger did not
    (second,) = [b.batch_id for b in ledger.pending()]
    assert second in fake_stripe.meter_events
    if keys_expired:  # resumed a day later: Stripe's identifier check is what stops a duplicate
        fake_stripe.expire_idempotency_keys()

    # A new process: a new store on the same database.
    fresh = BillingLedger(db.new_store())
    with client(fake_stripe.url) as stripe:
        report = run(fresh, stripe, config(), NOW + timedelta(minutes=10))
    assert report.ok
    first = report.outcomes[0]
    assert (first.batch.batch_id, first.resumed) == (second, True)
    assert len(fake_stripe.meter_events) == 3
    resent = [c for c in fake_stripe.calls("POST", EVENTS) if c.params["identifier"] == second]
    assert len(resent) == 2 and resent[0].pairs == resent[1].pairs
    assert [c.status for c in resent] == ([200, 400] if keys_expired else [200, 200])
    assert {r.state for r in fresh.batches()} == {"sent"}
    with client(fake_stripe.url) as stripe:
        assert run(fresh, stripe, config(), NOW + timedelta(minutes=20)).outcomes == []


def test_accounts_without_a_customer_are_reported_and_billed_once_they_have_one(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    a = seed(db.store, "acme", {0: 900})
    with client(fake_stripe.url) as stripe:
        report = run(ledger, stripe, config(), NOW)
        assert report.ok and report.outcomes == []
        ((skipped),) = report.plan.skipped
        assert (skipped.account_name, skipped.reason, skipped.tokens) == (
            "acme",
            "no-customer",
            900,
        )
        assert fake_stripe.calls("POST", EVENTS) == []
        ledger.set_customer("acme", "cus_A")
        subscribe_in_fake(fake_stripe, "cus_A")
        later = run(ledger, stripe, config(), NOW + timedelta(hours=1))
    assert [o.batch.batch_id for o in later.outcomes] == [meter_identifier(a, at(0), 0)]


def test_a_dry_run_sends_and_writes_nothing(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    _seed_two(db, ledger, fake_stripe)
    report = run(ledger, None, config(), NOW, dry_run=True)
    assert report.dry_run and len(report.plan.batches) == 3 and report.outcomes == []
    assert fake_stripe.requests == [] and ledger.batches() == []


def test_a_refused_api_key_stops_the_run(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    _seed_two(db, ledger, fake_stripe)
    fake_stripe.fail(401)
    with client(fake_stripe.url) as stripe:
        report = run(ledger, stripe, config(), NOW)
    assert report.aborted and "HTTP 401" in report.aborted and not report.ok
    assert len(fake_stripe.requests) == 1  # the subscription check: nothing reserved or sent
    assert ledger.batches() == [] and fake_stripe.calls("POST", EVENTS) == []


def test_the_window_is_closed_hours_within_the_lookback() -> None:
    start, end = runner.billing_window(NOW, config(lookback_hours=2))
    assert (start, end) == (at(2), at(4))
    start, end = runner.billing_window(
        NOW, config(), since=at(1), until=at(3) + timedelta(minutes=5)
    )
    assert (start, end) == (at(1), at(3))


def test_customers_without_an_active_subscription_are_skipped_and_reported(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    seed(db.store, "acme", {0: 900})
    seed(db.store, "beta", {0: 900})
    seed(db.store, "gamma", {0: 900})
    for name, customer in (("acme", "cus_A"), ("beta", "cus_B"), ("gamma", "cus_C")):
        ledger.set_customer(name, customer)
    subscribe_in_fake(fake_stripe, "cus_A")
    subscribe_in_fake(fake_stripe, "cus_B", status="incomplete_expired")  # invoices nothing
    with client(fake_stripe.url) as stripe:
        report = run(ledger, stripe, config(), NOW)
    assert [o.batch.stripe_customer_id for o in report.outcomes] == ["cus_A"]
    assert sorted((s.account_name, s.reason) for s in report.plan.skipped) == [
        ("beta", "no-subscription"),
        ("gamma", "no-subscription"),
    ]
    assert {e["payload"]["stripe_customer_id"] for e in fake_stripe.meter_events.values()} == {
        "cus_A"
    }
    # Once subscribed, the waiting hour is billed.
    subscribe_in_fake(fake_stripe, "cus_C")
    with client(fake_stripe.url) as stripe:
        later = run(ledger, stripe, config(), NOW + timedelta(hours=1))
    assert [o.batch.stripe_customer_id for o in later.outcomes] == ["cus_C"]


def test_a_run_without_the_metered_price_stops_before_sending(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    seed(db.store, "acme", {0: 900})
    ledger.set_customer("acme", "cus_A")
    with client(fake_stripe.url) as stripe:
        report = run(ledger, stripe, config(), NOW)
    assert not report.ok and "python -m billing setup" in (report.aborted or "")
    assert fake_stripe.calls("POST", EVENTS) == [] and ledger.batches() == []


def test_a_pending_meter_event_past_the_identifier_window_is_held_not_resent(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    _seed_two(db, ledger, fake_stripe)
    fake_stripe.fail(500, times=4, path=EVENTS)
    with client(fake_stripe.url, max_retries=3) as stripe:
        run(ledger, stripe, config(), NOW)
    (stuck,) = ledger.pending()

    def tries() -> int:
        calls = fake_stripe.calls("POST", EVENTS)
        return len([c for c in calls if c.params["identifier"] == stuck.batch_id])

    assert tries() == 4
    # The next run comes 25 hours later: Stripe may have forgotten the identifier, and the
    # failed tries may have reached it (a 500 after commit), so a resend could bill twice.
    later = lambda: datetime.now(timezone.utc) + timedelta(hours=25)  # noqa: E731
    with client(fake_stripe.url) as stripe:
        report = run(ledger, stripe, config(), NOW + timedelta(hours=25), clock=later)
    assert not report.ok
    (held,) = [o for o in report.outcomes if o.status == "review"]
    assert held.batch.batch_id == stuck.batch_id and "identifier window" in (held.error or "")
    assert tries() == 4  # not resent
    assert ledger.pending() == []  # held batches are not resumed...
    (record,) = ledger.batches(state="pending")
    assert record.batch.review_reason  # ...and stay visible
    with client(fake_stripe.url) as stripe:  # a later run leaves it alone too
        again = run(ledger, stripe, config(), NOW + timedelta(hours=26), clock=later)
    assert again.outcomes == [] and tries() == 4

    # A person checked Stripe: not there. Released, the next run sends it once.
    assert ledger.release_for_resend(stuck.batch_id)
    with client(fake_stripe.url) as stripe:
        resent = run(ledger, stripe, config(), NOW + timedelta(hours=27))
    assert [(o.batch.batch_id, o.status, o.resumed) for o in resent.outcomes] == [
        (stuck.batch_id, "sent", True)
    ]
    assert stuck.batch_id in fake_stripe.meter_events


def test_within_the_window_a_pending_meter_event_is_resent(
    db: Backend, ledger: BillingLedger, fake_stripe: FakeStripe
) -> None:
    _seed_two(db, ledger, fake_stripe)
    fake_stripe.fail(500, times=4, path=EVENTS)
    with client(fake_stripe.url, max_retries=3) as stripe:
        run(ledger, stripe, config(), NOW)
    (stuck,) = ledger.pending()
    soon = lambda: datetime.now(timezone.utc) + timedelta(hours=22)  # noqa: E731
    with client(fake_stripe.url) as stripe:
        report = run(ledger, stripe, config(), NOW + timedelta(hours=22), clock=soon)
    assert (stuck.batch_id, "sent") in [(o.batch.batch_id, o.status) for o in report.outcomes]
