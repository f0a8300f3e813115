"""One billing run: resume what an earlier run left pending, plan the closed hours, report the
plan to Stripe, and say what happened. The only module that talks to both the ledger and Stripe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from billing.job import (
    Batch,
    Mode,
    Plan,
    PlanConfig,
    closed_before,
    finalize_request,
    invoice_item_request,
    invoice_request,
    meter_event_request,
    plan,
)
from billing.ledger import BillingLedger
from billing.stripe_client import StripeClient, StripeError
from ccproxy.usage.events import as_utc, hour_of

if TYPE_CHECKING:
    from ccproxy.settings import Settings

log = logging.getLogger("billing")

Status = Literal["sent", "rejected", "failed", "taken"]


@dataclass(frozen=True)
class RunConfig:
    mode: Mode
    price_per_million: Decimal
    currency: str
    meter_event_name: str
    close_delay_s: int = 600
    lookback_hours: int = 816

    @classmethod
    def from_settings(cls, settings: Settings, mode: Mode | None = None) -> RunConfig:
        return cls(
            mode=mode or settings.billing_mode,
            price_per_million=settings.billing_price_per_million_tokens,
            currency=settings.billing_currency.lower(),
            meter_event_name=settings.billing_meter_event_name,
            close_delay_s=settings.billing_close_delay_s,
            lookback_hours=settings.billing_lookback_hours,
        )

    def plan_config(self) -> PlanConfig:
        return PlanConfig(self.mode, self.price_per_million, self.currency, self.meter_event_name)


@dataclass(frozen=True)
class Outcome:
    batch: Batch
    status: Status
    resumed: bool
    error: str | None = None


@dataclass
class RunReport:
    mode: Mode
    start: datetime
    end: datetime
    dry_run: bool
    plan: Plan
    pending: tuple[Batch, ...]
    outcomes: list[Outcome] = field(default_factory=list)
    aborted: str | None = None
    account_names: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """False when something was not billed for a reason that needs a person."""
        bad = any(o.status in ("failed", "rejected") for o in self.outcomes)
        return not bad and self.aborted is None


def billing_window(
    now: datetime, config: RunConfig, since: datetime | None = None, until: datetime | None = None
) -> tuple[datetime, datetime]:
    """[start, end): closed hours only, at most `lookback_hours` back unless `since` says more."""
    end = closed_before(now, config.close_delay_s)
    if until is not None:
        end = min(end, hour_of(until))
    start = hour_of(since) if since is not None else end - timedelta(hours=config.lookback_hours)
    return as_utc(start), as_utc(end)


def run(
    ledger: BillingLedger,
    client: StripeClient | None,
    config: RunConfig,
    now: datetime,
    *,
    dry_run: bool = False,
    since: datetime | None = None,
    until: datetime | None = None,
) -> RunReport:
    start, end = billing_window(now, config, since, until)
    pending = tuple(ledger.pending())
    report = RunReport(config.mode, start, end, dry_run, Plan(), pending)
    if not dry_run:
        if client is None:
            raise ValueError("a run that sends needs a Stripe client")
        for batch in pending:
            if not _deliver(client, ledger, batch, report, resumed=True):
                return report
        pending = tuple(ledger.pending())
    busy = frozenset(b.account_id for b in pending if b.mode == "invoice-items")
    accounts = ledger.accounts()
    report.account_names = {a.id: a.name for a in accounts.values()}
    report.plan = plan(ledger.unbilled(start, end), accounts, config.plan_config(), busy)
    if dry_run:
        return report
    assert client is not None
    for batch in report.plan.batches:
        if not ledger.reserve(batch):
            # Another run holds these hours; it reports them.
            report.outcomes.append(Outcome(batch, "taken", resumed=False))
            continue
        if not _deliver(client, ledger, batch, report, resumed=False):
            break
    return report


def _deliver(
    client: StripeClient, ledger: BillingLedger, batch: Batch, report: RunReport, *, resumed: bool
) -> bool:
    """Send one batch and book the outcome. False: stop the run (Stripe refused the key)."""
    # Ids of Stripe objects this batch has, beyond those the ledger held when it started.
    in_stripe: list[str] = []
    try:
        if batch.mode == "meters":
            _send_meter_event(client, ledger, batch)
        else:
            _send_invoice(client, ledger, batch, in_stripe, resumed)
    except StripeError as exc:
        error = str(exc)
        log.error("batch %s (account %s): %s", batch.batch_id, batch.account_id, error)
        nothing_in_stripe = not in_stripe and batch.stripe_object_id is None
        if exc.refused and nothing_in_stripe:
            ledger.reject(batch.batch_id, error)
            report.outcomes.append(Outcome(batch, "rejected", resumed, error))
        else:
            ledger.note_error(batch.batch_id, error)
            report.outcomes.append(Outcome(batch, "failed", resumed, error))
        if exc.authentication:
            report.aborted = error
            return False
        return True
    report.outcomes.append(Outcome(batch, "sent", resumed))
    return True


def _send_meter_event(client: StripeClient, ledger: BillingLedger, batch: Batch) -> None:
    try:
        client.send(meter_event_request(batch))
    except StripeError as exc:
        # The identifier is the account-hour report itself: Stripe holding it means delivered.
        if not exc.duplicate_meter_event:
            raise
        log.info("meter event %s was already delivered", batch.batch_id)
    ledger.mark_sent(batch.batch_id, stripe_object_id=batch.batch_id)


def _send_invoice(
    client: StripeClient,
    ledger: BillingLedger,
    batch: Batch,
    in_stripe: list[str],
    resumed: bool,
) -> None:
    """Invoice item, then an invoice that takes it in, then finalize; each Stripe id is written
    to the ledger before the next call, so a resumed run picks up at the step that is missing.
    A resumed batch first looks for the object in Stripe (by the batch id in its metadata): a
    crash may have come after Stripe created it and after the idempotency key expired."""
    item_id = batch.stripe_object_id
    if item_id is None and resumed:
        item_id = _find(client, "/v1/invoiceitems", batch)
    if item_id is None:
        item_id = str(client.send(invoice_item_request(batch))["id"])
    if batch.stripe_object_id is None:
        in_stripe.append(item_id)
        ledger.record(batch.batch_id, stripe_object_id=item_id)
    invoice_id = batch.stripe_invoice_id
    if invoice_id is None and resumed:
        invoice_id = _find(client, "/v1/invoices", batch)
    if invoice_id is None:
        invoice_id = str(client.send(invoice_request(batch))["id"])
    if batch.stripe_invoice_id is None:
        in_stripe.append(invoice_id)
        ledger.record(batch.batch_id, stripe_invoice_id=invoice_id)
    try:
        client.send(finalize_request(batch, invoice_id))
    except StripeError:
        # A resumed run whose idempotency key has expired: the invoice may be final already.
        if not _finalized(client, invoice_id):
            raise
    ledger.mark_sent(batch.batch_id)


def _find(client: StripeClient, path: str, batch: Batch) -> str | None:
    """The id of the customer's most recent object (of 100) made for this batch, if any."""
    page = client.get(path, {"customer": batch.stripe_customer_id, "limit": 100})
    for obj in page.get("data") or []:
        if (obj.get("metadata") or {}).get("ccproxy_batch_id") == batch.batch_id:
            return str(obj["id"])
    return None


def _finalized(client: StripeClient, invoice_id: str) -> bool:
    try:
        status = client.get(f"/v1/invoices/{invoice_id}").get("status")
    except StripeError:
        return False  # unknown: the finalize error is the one to report
    return status in ("open", "paid", "uncollectible", "void")
