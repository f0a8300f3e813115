"""One billing run: resume what an earlier run left pending, plan the closed hours, report the
plan to Stripe, and say what happened. The only module that talks to both the ledger and Stripe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

from billing.catalog import find_price, has_active_subscription
from billing.job import (
    Batch,
    BillingAccount,
    Mode,
    Plan,
    PlanConfig,
    closed_before,
    finalize_request,
    invoice_item_request,
    invoice_lines,
    invoice_request,
    meter_event_request,
    plan,
    with_line_object,
)
from billing.ledger import BillingLedger
from billing.stripe_client import StripeClient, StripeError
from ccproxy.pricing import PriceTable, load_table
from ccproxy.usage.events import as_utc, hour_of

if TYPE_CHECKING:
    from ccproxy.settings import Settings

log = logging.getLogger("billing")

Status = Literal["sent", "rejected", "failed", "taken", "review"]

# Stripe keeps a meter event's identifier unique "within a rolling period of at least 24
# hours"; after that, a resend with the same identifier may be counted a second time. A
# pending meter event older than this (with an hour's margin for clock skew and a slow run)
# is never resent automatically: it is held for a person, who checks Stripe's meter event
# summaries and resolves it with `python -m billing review`.
METER_IDENTIFIER_WINDOW = timedelta(hours=24)
RESEND_LIMIT = METER_IDENTIFIER_WINDOW - timedelta(hours=1)


@dataclass(frozen=True)
class RunConfig:
    mode: Mode
    prices: PriceTable
    currency: str
    meter_event_name: str
    price_lookup_key: str = "ccproxy_usage_micro"
    close_delay_s: int = 600
    lookback_hours: int = 816

    @classmethod
    def from_settings(cls, settings: Settings, mode: Mode | None = None) -> RunConfig:
        return cls(
            mode=mode or settings.billing_mode,
            prices=load_table(settings.billing_prices, settings.billing_price_per_million_tokens),
            currency=settings.billing_currency.lower(),
            meter_event_name=settings.billing_meter_event_name,
            price_lookup_key=settings.billing_price_lookup_key,
            close_delay_s=settings.billing_close_delay_s,
            lookback_hours=settings.billing_lookback_hours,
        )

    def plan_config(self) -> PlanConfig:
        return PlanConfig(self.mode, self.prices, self.currency, self.meter_event_name)


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
        bad = any(o.status in ("failed", "rejected", "review") for o in self.outcomes)
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
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> RunReport:
    """`now` places the billing window; `clock` is the wall clock that the ledger's created_at
    times come from (the identifier-window check compares against it)."""
    start, end = billing_window(now, config, since, until)
    pending = tuple(ledger.pending())
    report = RunReport(config.mode, start, end, dry_run, Plan(), pending)
    if not dry_run:
        if client is None:
            raise ValueError("a run that sends needs a Stripe client")
        created = {r.batch.batch_id: r.created_at for r in ledger.batches(state="pending")}
        for batch in pending:
            age = clock() - created[batch.batch_id]
            if batch.mode == "meters" and age > RESEND_LIMIT:
                reason = (
                    f"meter event first sent {age.total_seconds() / 3600:.1f} h ago, past "
                    "Stripe's 24 h identifier window: a resend could be counted twice. Check the "
                    "customer's meter event summaries for this hour, then `python -m billing "
                    "review --batch ID --delivered` or `--resend`"
                )
                ledger.hold_for_review(batch.batch_id, reason)
                report.outcomes.append(Outcome(batch, "review", True, reason))
                continue
            if not _deliver(client, ledger, batch, report, resumed=True):
                return report
        pending = tuple(ledger.pending())
    busy = frozenset(b.account_id for b in pending if b.mode == "invoice-items")
    accounts = ledger.accounts()
    report.account_names = {a.id: a.name for a in accounts.values()}
    unbilled = ledger.unbilled(start, end)
    unsubscribed: frozenset[str] = frozenset()
    if config.mode == "meters" and client is not None and unbilled:
        try:
            unsubscribed = _unsubscribed(client, config, accounts, {r.account_id for r in unbilled})
        except (StripeError, LookupError) as exc:
            report.aborted = str(exc)
            return report
    report.plan = plan(unbilled, accounts, config.plan_config(), busy, unsubscribed)
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


def _unsubscribed(
    client: StripeClient,
    config: RunConfig,
    accounts: dict[str, BillingAccount],
    account_ids: set[str],
) -> frozenset[str]:
    """Accounts whose customer has no active subscription to the metered price: Stripe
    accepts their meter events but never invoices them, so they are not sent."""
    customers = {
        account_id: account.stripe_customer_id
        for account_id in sorted(account_ids)
        if (account := accounts.get(account_id)) is not None and account.stripe_customer_id
    }
    if not customers:
        return frozenset()  # nothing to check: plan() reports these accounts for other reasons
    price = find_price(client, config.price_lookup_key)
    if price is None:
        raise LookupError(
            f"no active Stripe price with lookup key {config.price_lookup_key!r}: "
            "run `python -m billing setup`"
        )
    return frozenset(
        account_id
        for account_id, customer_id in customers.items()
        if not has_active_subscription(client, customer_id, str(price["id"]))
    )


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
        nothing_in_stripe = not in_stripe and not batch.in_stripe
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
        # The identifier is the account-hour report itself: Stripe holding it means delivered
        # (a batch older than the identifier window never gets here: see run()).
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
    """One invoice item per priced line, then an invoice that takes them in, then finalize;
    each Stripe id is written to the ledger before the next call, so a resumed run picks up at
    the step that is missing. A resumed batch first looks for each object in Stripe (by the
    batch id and line number in its metadata): a crash may have come after Stripe created it
    and after the idempotency key expired."""
    items: list[dict[str, Any]] | None = None
    for line in invoice_lines(batch):
        item_id = line.stripe_object_id
        if item_id is None and resumed:
            if items is None:
                items = _mine(client, "/v1/invoiceitems", batch)
            item_id = next(
                (
                    str(o["id"])
                    for o in items
                    if (o.get("metadata") or {}).get("ccproxy_line") == str(line.line_no)
                ),
                None,
            )
        if item_id is None:
            item_id = str(client.send(invoice_item_request(batch, line))["id"])
        if line.stripe_object_id is None:
            in_stripe.append(item_id)
            ledger.record_line(batch.batch_id, line.line_no, item_id)
            batch = with_line_object(batch, line.line_no, item_id)
        if batch.stripe_object_id is None:
            # The batch row names its first item too: `status` shows it.
            ledger.record(batch.batch_id, stripe_object_id=item_id)
            batch = replace(batch, stripe_object_id=item_id)
    invoice_id = batch.stripe_invoice_id
    if invoice_id is None and resumed:
        found = _mine(client, "/v1/invoices", batch)
        invoice_id = str(found[0]["id"]) if found else None
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


def _mine(client: StripeClient, path: str, batch: Batch) -> list[dict[str, Any]]:
    """The customer's most recent objects (of 100) made for this batch, newest first."""
    page = client.get(path, {"customer": batch.stripe_customer_id, "limit": 100})
    return [
        obj
        for obj in page.get("data") or []
        if (obj.get("metadata") or {}).get("ccproxy_batch_id") == batch.batch_id
    ]


def _finalized(client: StripeClient, invoice_id: str) -> bool:
    try:
        status = client.get(f"/v1/invoices/{invoice_id}").get("status")
    except StripeError:
        return False  # unknown: the finalize error is the one to report
    return status in ("open", "paid", "uncollectible", "void")
