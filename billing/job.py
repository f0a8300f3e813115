"""What to bill: closed hours of usage -> batches of billable tokens, and the Stripe requests
that report them. Pure functions: no database, no network, no clock.

Money is Decimal and integers, never floats. Two modes, two rounding rules:
- `meters`: a meter event carries the token count only; Stripe's metered price
  (`unit_amount_decimal`, in cents per token) turns the month's sum into money and rounds the
  invoice line to the cent. Nothing is rounded here.
- `invoice-items`: an invoice item carries an amount in cents, computed here once per batch
  as tokens x price, rounded half-up to the cent. A batch whose amount rounds to zero is not
  billed yet; its tokens stay unbilled and join the next run's batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from ccproxy.usage.events import as_utc, hour_of

Mode = Literal["meters", "invoice-items"]
MODES: tuple[Mode, ...] = ("meters", "invoice-items")
SkipReason = Literal["no-customer", "unknown-account", "under-one-cent", "pending-batch"]

HOUR = timedelta(hours=1)
TOKENS_PER_PRICE = 1_000_000  # the price is per million tokens
MINOR_PER_MAJOR = 100  # cents per dollar (a currency with cents is assumed)
# Stripe accepts unit_amount_decimal with at most 12 decimal places.
_STRIPE_DECIMAL_PLACES = 12
# Stripe limits a meter event's identifier to 100 characters.
_MAX_IDENTIFIER = 100


# --- money -----------------------------------------------------------------------------------
def amount_minor(tokens: int, price_per_million: Decimal) -> int:
    """tokens x price in cents, rounded half-up once (the invoice-items amount)."""
    exact = Decimal(tokens) * price_per_million * MINOR_PER_MAJOR / TOKENS_PER_PRICE
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def unit_amount_decimal(price_per_million: Decimal) -> str:
    """The metered price per token in cents, as Stripe's `unit_amount_decimal` string."""
    per_token = (price_per_million * MINOR_PER_MAJOR / TOKENS_PER_PRICE).normalize()
    exponent = per_token.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > _STRIPE_DECIMAL_PLACES:
        raise ValueError(
            f"price per token {per_token} cents needs more than {_STRIPE_DECIMAL_PLACES} "
            "decimal places, which Stripe does not accept"
        )
    return format(per_token, "f")


def format_minor(amount: int, currency: str) -> str:
    return f"{Decimal(amount) / MINOR_PER_MAJOR:.2f} {currency.upper()}"


# --- time ------------------------------------------------------------------------------------
def closed_before(now: datetime, close_delay_s: int) -> datetime:
    """The end (exclusive) of the closed hours: hour H is closed once H + 1h + delay <= now."""
    return hour_of(as_utc(now) - timedelta(seconds=close_delay_s))


def hour_label(hour: datetime) -> str:
    return as_utc(hour).strftime("%Y-%m-%dT%H:%MZ")


# --- what the ledger hands in ----------------------------------------------------------------
@dataclass(frozen=True)
class BillingAccount:
    id: str
    name: str
    stripe_customer_id: str | None


@dataclass(frozen=True)
class Unbilled:
    """Tokens of one account-hour not yet in the ledger. `seq` is the ledger sequence number the
    report will take: 0 for an hour never billed, n > 0 for usage recorded after n reports."""

    account_id: str
    hour: datetime
    seq: int
    tokens_after: int


@dataclass(frozen=True)
class Line:
    """One ledger row: part of an account-hour, billed by one batch."""

    hour: datetime
    seq: int
    tokens_after: int


@dataclass(frozen=True)
class Batch:
    """One report to Stripe. Everything a resend needs is here, so a batch read back from the
    ledger after a crash produces byte-identical requests (same identifiers, same keys)."""

    batch_id: str
    mode: Mode
    account_id: str
    stripe_customer_id: str
    period_start: datetime
    period_end: datetime
    quantity: int
    amount_minor: int | None
    currency: str
    meter_event_name: str | None
    lines: tuple[Line, ...]
    # Progress of an invoice-items batch, recorded after each Stripe call.
    stripe_object_id: str | None = None
    stripe_invoice_id: str | None = None


@dataclass(frozen=True)
class Skipped:
    account_id: str
    account_name: str | None
    reason: SkipReason
    hours: int
    tokens_after: int


@dataclass(frozen=True)
class Plan:
    batches: tuple[Batch, ...] = ()
    skipped: tuple[Skipped, ...] = ()


@dataclass(frozen=True)
class PlanConfig:
    mode: Mode
    price_per_million: Decimal
    currency: str
    meter_event_name: str


# --- identifiers -----------------------------------------------------------------------------
def _digest(text: str, length: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def meter_identifier(account_id: str, hour: datetime, seq: int) -> str:
    """Deterministic per account-hour report: a retry or a resumed run sends the same one, and
    Stripe refuses a second event with it."""
    account = account_id if len(account_id) <= 60 else _digest(account_id, 32)
    identifier = f"ccproxy-{account}-{as_utc(hour):%Y%m%dT%H}-{seq}"
    assert len(identifier) <= _MAX_IDENTIFIER
    return identifier


def invoice_batch_id(account_id: str, lines: Sequence[Line]) -> str:
    """Deterministic per set of lines, so that re-planning the same hours gives the same id."""
    content = ",".join(f"{hour_label(x.hour)}/{x.seq}/{x.tokens_after}" for x in lines)
    return f"ccproxy-ii-{_digest(account_id + '|' + content, 24)}"


# --- planning --------------------------------------------------------------------------------
def plan(
    unbilled: Iterable[Unbilled],
    accounts: Mapping[str, BillingAccount],
    config: PlanConfig,
    busy_accounts: frozenset[str] = frozenset(),
) -> Plan:
    """Batches for the unbilled account-hours. Accounts that cannot be billed are reported in
    `skipped` and their hours stay unbilled. `busy_accounts` (invoice-items mode: accounts with
    a batch still pending) wait, so one invoice never sweeps up another batch's item."""
    by_account: dict[str, list[Unbilled]] = {}
    for row in unbilled:
        if row.tokens_after > 0:
            by_account.setdefault(row.account_id, []).append(row)
    batches: list[Batch] = []
    skipped: list[Skipped] = []
    for account_id in sorted(by_account):
        rows = sorted(by_account[account_id], key=lambda r: (r.hour, r.seq))
        account = accounts.get(account_id)
        made: list[Batch] = []
        reason: SkipReason
        if account is None:
            reason = "unknown-account"
        elif not account.stripe_customer_id:
            reason = "no-customer"
        elif config.mode == "invoice-items" and account_id in busy_accounts:
            reason = "pending-batch"
        else:
            made = _batches(account_id, account.stripe_customer_id, rows, config)
            reason = "under-one-cent"
        if made:
            batches.extend(made)
            continue
        hours = len({r.hour for r in rows})
        tokens = sum(r.tokens_after for r in rows)
        name = account.name if account else None
        skipped.append(Skipped(account_id, name, reason, hours, tokens))
    return Plan(tuple(batches), tuple(skipped))


def _batches(
    account_id: str, customer_id: str, rows: Sequence[Unbilled], config: PlanConfig
) -> list[Batch]:
    if config.mode == "meters":
        return [
            Batch(
                batch_id=meter_identifier(account_id, r.hour, r.seq),
                mode="meters",
                account_id=account_id,
                stripe_customer_id=customer_id,
                period_start=r.hour,
                period_end=r.hour + HOUR,
                quantity=r.tokens_after,
                amount_minor=None,
                currency=config.currency,
                meter_event_name=config.meter_event_name,
                lines=(Line(r.hour, r.seq, r.tokens_after),),
            )
            for r in rows
        ]
    lines = tuple(Line(r.hour, r.seq, r.tokens_after) for r in rows)
    quantity = sum(x.tokens_after for x in lines)
    amount = amount_minor(quantity, config.price_per_million)
    if amount <= 0:
        return []
    return [
        Batch(
            batch_id=invoice_batch_id(account_id, lines),
            mode="invoice-items",
            account_id=account_id,
            stripe_customer_id=customer_id,
            period_start=min(x.hour for x in lines),
            period_end=max(x.hour for x in lines) + HOUR,
            quantity=quantity,
            amount_minor=amount,
            currency=config.currency,
            meter_event_name=None,
            lines=lines,
        )
    ]


# --- the Stripe requests ---------------------------------------------------------------------
@dataclass(frozen=True)
class StripeRequest:
    method: Literal["GET", "POST"]
    path: str
    params: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None


def post_request(path: str, params: dict[str, Any], key_prefix: str) -> StripeRequest:
    # The key names the parameters too: Stripe refuses a key reused with other parameters,
    # and a changed request (a corrected customer id) must be a new request, not a replay.
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return StripeRequest("POST", path, params, f"{key_prefix}-{_digest(canonical, 12)}")


def _ts(value: datetime) -> int:
    return int(as_utc(value).timestamp())


def meter_event_request(batch: Batch) -> StripeRequest:
    """The hour's tokens as one meter event, timestamped at the hour's start so that Stripe
    counts it in the billing period the hour belongs to."""
    assert batch.mode == "meters" and batch.meter_event_name
    params = {
        "event_name": batch.meter_event_name,
        "identifier": batch.batch_id,
        "timestamp": _ts(batch.period_start),
        "payload": {"stripe_customer_id": batch.stripe_customer_id, "value": str(batch.quantity)},
    }
    return post_request("/v1/billing/meter_events", params, batch.batch_id)


def _metadata(batch: Batch) -> dict[str, str]:
    return {
        "ccproxy_batch_id": batch.batch_id,
        "ccproxy_account_id": batch.account_id,
        "tokens_after": str(batch.quantity),
    }


def invoice_item_request(batch: Batch) -> StripeRequest:
    # Built from the batch alone (not from settings), so a resend is the same request.
    assert batch.mode == "invoice-items" and batch.amount_minor is not None
    description = (
        f"ccproxy: {batch.quantity:,} tokens after compression, "
        f"{hour_label(batch.period_start)} to {hour_label(batch.period_end)}"
    )
    params = {
        "customer": batch.stripe_customer_id,
        "amount": batch.amount_minor,
        "currency": batch.currency,
        "description": description,
        "period": {"start": _ts(batch.period_start), "end": _ts(batch.period_end)},
        "metadata": _metadata(batch),
    }
    return post_request("/v1/invoiceitems", params, f"{batch.batch_id}-item")


def invoice_request(batch: Batch) -> StripeRequest:
    """A one-off invoice that takes the customer's pending items, ours included. Not advanced
    automatically: `finalize_request` finalizes it now, so the job knows it happened."""
    params = {
        "customer": batch.stripe_customer_id,
        "currency": batch.currency,
        "pending_invoice_items_behavior": "include",
        "auto_advance": False,
        "metadata": _metadata(batch),
    }
    return post_request("/v1/invoices", params, f"{batch.batch_id}-invoice")


def finalize_request(batch: Batch, invoice_id: str) -> StripeRequest:
    # auto_advance after finalizing: Stripe then collects it (charges or emails the invoice).
    params = {"auto_advance": True}
    return post_request(f"/v1/invoices/{invoice_id}/finalize", params, f"{batch.batch_id}-finalize")


def as_dict(batch: Batch) -> dict[str, Any]:
    """A batch for --json output and logs: ids and numbers only."""
    return {
        "batch_id": batch.batch_id,
        "mode": batch.mode,
        "account_id": batch.account_id,
        "stripe_customer_id": batch.stripe_customer_id,
        "period_start": as_utc(batch.period_start).isoformat(),
        "period_end": as_utc(batch.period_end).isoformat(),
        "hours": len({x.hour for x in batch.lines}),
        "tokens_after": batch.quantity,
        "amount_minor": batch.amount_minor,
        "currency": batch.currency,
        "stripe_object_id": batch.stripe_object_id,
        "stripe_invoice_id": batch.stripe_invoice_id,
    }
