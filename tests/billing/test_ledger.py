"""The ledger on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from billing.job import Batch, Line, Unbilled, Usage, plan
from billing.ledger import BillingLedger
from tests.billing.helpers import at, config, seed
from tests.usage.conftest import Backend
from tests.usage.helpers import make_event


MINI = "gpt-4o-mini"  # make_event's model


def _order(row: Unbilled) -> tuple[str, object]:
    return row.account_id, row.hour


def _u(account_id: str, hour: int, seq: int, tokens_after: int) -> Unbilled:
    """seed()'s usage: tokens_before = 2 x tokens_after, no cached or completion tokens."""
    return Unbilled(account_id, at(hour), seq, MINI, "chat", Usage(2 * tokens_after, tokens_after))


def _batches(ledger: BillingLedger, mode: str = "meters") -> list[Batch]:
    rows = ledger.unbilled(at(0), at(4))
    return list(plan(rows, ledger.accounts(), config(mode).plan_config()).batches)


def test_unbilled_is_what_the_ledger_does_not_cover(db: Backend, ledger: BillingLedger) -> None:
    a = seed(db.store, "acme", {0: 900, 1: 1200, 3: 30})
    b = seed(db.store, "beta", {1: 77})
    assert sorted(ledger.unbilled(at(0), at(4)), key=_order) == sorted(
        [
            _u(a, 0, 0, 900),
            _u(a, 1, 0, 1200),
            _u(a, 3, 0, 30),
            _u(b, 1, 0, 77),
        ],
        key=_order,
    )
    assert sorted(ledger.unbilled(at(1), at(3)), key=_order) == sorted(
        [_u(a, 1, 0, 1200), _u(b, 1, 0, 77)], key=_order
    )


def test_reserved_hours_drop_out_and_late_usage_comes_back_as_the_next_seq(
    db: Backend, ledger: BillingLedger
) -> None:
    a = seed(db.store, "acme", {0: 900, 1: 1200})
    ledger.set_customer("acme", "cus_A")
    first = _batches(ledger)
    assert all(ledger.reserve(b) for b in first)
    assert ledger.unbilled(at(0), at(4)) == []
    # Usage recorded after the hour was billed (an outbox replay): only the difference.
    late_event = make_event(
        a, created_at=at(0) + timedelta(minutes=59), tokens_after=55, cached_tokens=20
    )
    db.store.write_events([late_event])
    left = Usage(1000, 55, 20, 25)  # make_event: 1000 before, 25 completion tokens
    assert ledger.unbilled(at(0), at(4)) == [Unbilled(a, at(0), 1, MINI, "chat", left)]
    (late,) = _batches(ledger)
    assert late.lines == (Line(at(0), 1, MINI, "chat", left),)
    assert [(x.token_class, x.tokens) for x in late.priced] == [
        ("input", 35),
        ("cached_input", 20),
        ("output", 25),
    ]
    assert ledger.reserve(late)
    assert ledger.unbilled(at(0), at(4)) == []


def test_an_account_hour_is_reserved_once(db: Backend, ledger: BillingLedger) -> None:
    seed(db.store, "acme", {0: 900})
    ledger.set_customer("acme", "cus_A")
    (batch,) = _batches(ledger)
    assert ledger.reserve(batch)
    # Another run that planned the same hour (under another batch id) gets nothing.
    assert not ledger.reserve(replace(batch, batch_id="other"))
    assert [r.batch.batch_id for r in ledger.batches()] == [batch.batch_id]


def test_a_pending_batch_reads_back_as_it_was_stored(db: Backend, ledger: BillingLedger) -> None:
    seed(db.store, "acme", {0: 900, 2: 1100})
    ledger.set_customer("acme", "cus_A")
    (batch,) = _batches(ledger, "invoice-items")
    assert ledger.reserve(batch)
    assert ledger.pending() == [batch]
    ledger.record(batch.batch_id, stripe_object_id="ii_1")
    ledger.record(batch.batch_id, stripe_invoice_id="in_1")
    assert ledger.pending() == [replace(batch, stripe_object_id="ii_1", stripe_invoice_id="in_1")]
    ledger.mark_sent(batch.batch_id)
    assert ledger.pending() == []
    (record,) = ledger.batches()
    assert record.state == "sent" and record.sent_at is not None
    assert record.batch.stripe_object_id == "ii_1"


def test_a_rejected_batch_frees_its_hours(db: Backend, ledger: BillingLedger) -> None:
    a = seed(db.store, "acme", {0: 900})
    ledger.set_customer("acme", "cus_A")
    (batch,) = _batches(ledger)
    ledger.reserve(batch)
    ledger.note_error(batch.batch_id, "Stripe HTTP 500: boom")
    assert ledger.batches()[0].last_error == "Stripe HTTP 500: boom"
    ledger.reject(batch.batch_id, "Stripe HTTP 400: No such customer")
    assert ledger.pending() == []
    assert ledger.unbilled(at(0), at(4)) == [_u(a, 0, 0, 900)]
    (record,) = ledger.batches(state="rejected")
    assert record.last_error == "Stripe HTTP 400: No such customer"
    # The same report can be planned and reserved again (the rejected row makes way).
    assert ledger.reserve(batch)
    assert [r.state for r in ledger.batches()] == ["pending"]


def test_customers(db: Backend, ledger: BillingLedger) -> None:
    a = db.store.ensure_account("acme")
    assert ledger.account("acme").stripe_customer_id is None  # type: ignore[union-attr]
    assert ledger.set_customer("acme", "cus_1")
    assert not ledger.set_customer("nobody", "cus_2")
    assert ledger.accounts()[a].stripe_customer_id == "cus_1"
    assert db.store.account_by_name("acme").stripe_customer_id == "cus_1"  # type: ignore[union-attr]
