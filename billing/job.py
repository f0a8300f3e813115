"""What to bill: closed hours of usage -> batches of priced lines, and the Stripe requests that
report them. Pure functions: no database, no network, no clock.

Every usage row (one account, hour, model and kind) is priced with the price table
(ccproxy/pricing.py): input, cached input and output tokens of chat, tokens scored by
/v1/compress. Money is Decimal and integers, never floats. Two modes, two rounding rules:
- `meters`: one meter event per account-hour whose value is the hour's cost in millionths of
  the currency's main unit: the exact sum of its priced lines, rounded half-up once per event
  (at most half a millionth off per event). Stripe's metered price is 0.0001 cents per unit,
  so Stripe's monthly sum is the money, rounded by Stripe to the cent on the invoice.
- `invoice-items`: one invoice item per priced line (model x token class over the batch's
  hours), its amount the exact line amount rounded half-up to the cent, once per line. A line
  that rounds to 0 cents is not sent (its tokens are covered: at most half a cent per line and
  batch); a batch whose lines add up to 0 cents is not billed yet and joins the next run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from ccproxy.pricing import (
    MICRO_PER_MAJOR,
    MINOR_PER_MAJOR,
    TOKENS_PER_PRICE,
    PriceTable,
    TokenClass,
    to_micro,
    to_minor,
)
from ccproxy.usage.events import as_utc, hour_of

Mode = Literal["meters", "invoice-items"]
MODES: tuple[Mode, ...] = ("meters", "invoice-items")
SkipReason = Literal[
    "no-customer", "unknown-account", "under-one-cent", "pending-batch", "no-subscription"
]

HOUR = timedelta(hours=1)
# Stripe accepts unit_amount_decimal with at most 12 decimal places.
_STRIPE_DECIMAL_PLACES = 12
# Stripe limits a meter event's identifier to 100 characters.
_MAX_IDENTIFIER = 100


# --- money -----------------------------------------------------------------------------------
def amount_minor(tokens: int, price_per_million: Decimal) -> int:
    """tokens x price in cents, rounded half-up once (one invoice line's amount)."""
    return to_minor(Decimal(tokens) * price_per_million / TOKENS_PER_PRICE)


def unit_amount_decimal(price_per_million: Decimal) -> str:
    """A price per million units as Stripe's `unit_amount_decimal`: cents per unit."""
    per_token = (price_per_million * MINOR_PER_MAJOR / TOKENS_PER_PRICE).normalize()
    exponent = per_token.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > _STRIPE_DECIMAL_PLACES:
        raise ValueError(
            f"price per token {per_token} cents needs more than {_STRIPE_DECIMAL_PLACES} "
            "decimal places, which Stripe does not accept"
        )
    return format(per_token, "f")


# The meters mode's metered price: one unit is a millionth of the main unit, 0.0001 cents.
MICRO_UNIT_AMOUNT_DECIMAL = unit_amount_decimal(Decimal(TOKENS_PER_PRICE) / MICRO_PER_MAJOR)


def format_minor(amount: int, currency: str) -> str:
    return f"{Decimal(amount) / MINOR_PER_MAJOR:.2f} {currency.upper()}"


def format_micro(amount: int, currency: str) -> str:
    return f"{Decimal(amount) / MICRO_PER_MAJOR:.6f} {currency.upper()}"


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
class Usage:
    """The summed columns of hourly rows that billing prices (or a difference of two sums)."""

    tokens_before: int = 0
    tokens_after: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.tokens_before + other.tokens_before,
            self.tokens_after + other.tokens_after,
            self.cached_tokens + other.cached_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def minus(self, billed: Usage) -> Usage:
        """What is left after `billed`; never negative (the totals only grow)."""
        return Usage(
            max(0, self.tokens_before - billed.tokens_before),
            max(0, self.tokens_after - billed.tokens_after),
            max(0, self.cached_tokens - billed.cached_tokens),
            max(0, self.completion_tokens - billed.completion_tokens),
        )

    def any(self) -> bool:
        return any((self.tokens_before, self.tokens_after, self.cached_tokens, self.completion_tokens))

    def billable(self, kind: str) -> bool:
        """Whether any column that the price table prices for `kind` is non-zero (chat does
        not price tokens_before, compress prices nothing else)."""
        if kind == "compress":
            return self.tokens_before > 0
        return any((self.tokens_after, self.cached_tokens, self.completion_tokens))


@dataclass(frozen=True)
class Unbilled:
    """Usage of one account-hour, model and kind not yet in the ledger. `seq` is the report
    number the account-hour's next batch takes: 0 for an hour never billed, n > 0 after n."""

    account_id: str
    hour: datetime
    seq: int
    model: str
    kind: str
    usage: Usage


@dataclass(frozen=True)
class Line:
    """One ledger row: the usage of an account-hour, model and kind that one batch billed."""

    hour: datetime
    seq: int
    model: str
    kind: str
    usage: Usage


@dataclass(frozen=True)
class PricedLine:
    """One token class of one model (or of compression) over a batch's lines, priced. Stored
    with the batch, so a resend carries these numbers even if the price table has changed."""

    line_no: int
    model: str
    kind: str
    token_class: TokenClass
    priced_as: str
    tokens: int
    price_per_million: Decimal
    amount_minor: int | None  # invoice items: the item's cents; meters: None
    stripe_object_id: str | None = None  # invoice items: the item, once Stripe made it

    @property
    def amount(self) -> Decimal:
        """The exact amount in the main unit."""
        return Decimal(self.tokens) * self.price_per_million / TOKENS_PER_PRICE


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
    # meters: the meter event's value (millionths of the main unit); invoice items: tokens.
    quantity: int
    amount_minor: int | None  # invoice items: the sum of the lines' cents
    currency: str
    meter_event_name: str | None
    lines: tuple[Line, ...]
    priced: tuple[PricedLine, ...] = ()
    # Progress of an invoice-items batch, recorded after each Stripe call.
    stripe_object_id: str | None = None
    stripe_invoice_id: str | None = None
    review_reason: str | None = None

    @property
    def tokens(self) -> int:
        return sum(x.tokens for x in self.priced)

    @property
    def in_stripe(self) -> bool:
        """Whether Stripe holds any object of this batch (as far as the ledger knows)."""
        return bool(
            self.stripe_object_id
            or self.stripe_invoice_id
            or any(x.stripe_object_id for x in self.priced)
        )


@dataclass(frozen=True)
class Skipped:
    account_id: str
    account_name: str | None
    reason: SkipReason
    hours: int
    tokens: int


@dataclass(frozen=True)
class Plan:
    batches: tuple[Batch, ...] = ()
    skipped: tuple[Skipped, ...] = ()


@dataclass(frozen=True)
class PlanConfig:
    mode: Mode
    prices: PriceTable
    currency: str
    meter_event_name: str


# --- identifiers -----------------------------------------------------------------------------
def _digest(text: str, length: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def meter_identifier(account_id: str, hour: datetime, seq: int) -> str:
    """Deterministic per account-hour report: a retry or a resumed run sends the same one, and
    Stripe refuses a second event with it (for at least 24 hours: see runner.py)."""
    account = account_id if len(account_id) <= 60 else _digest(account_id, 32)
    identifier = f"ccproxy-{account}-{as_utc(hour):%Y%m%dT%H}-{seq}"
    assert len(identifier) <= _MAX_IDENTIFIER
    return identifier


def _line_key(x: Line) -> str:
    u = x.usage
    return (
        f"{hour_label(x.hour)}/{x.seq}/{x.model}/{x.kind}/"
        f"{u.tokens_before}/{u.tokens_after}/{u.cached_tokens}/{u.completion_tokens}"
    )


def invoice_batch_id(account_id: str, lines: Sequence[Line]) -> str:
    """Deterministic per set of lines, so that re-planning the same hours gives the same id."""
    content = ",".join(_line_key(x) for x in lines)
    return f"ccproxy-ii-{_digest(account_id + '|' + content, 24)}"


# --- pricing ---------------------------------------------------------------------------------
def price_lines(
    lines: Sequence[Line], prices: PriceTable, *, to_cents: bool
) -> tuple[PricedLine, ...]:
    """The lines' usage summed per (kind, model), priced per token class; classes with no
    tokens are left out. Sorted (kind, model, class), so the order is stable across runs.
    Compression is priced whatever the model, so all of it is one line (model "")."""
    by_model: dict[tuple[str, str], Usage] = {}
    for x in lines:
        key = (x.kind, "" if x.kind == "compress" else x.model)
        by_model[key] = by_model.get(key, Usage()) + x.usage
    priced: list[PricedLine] = []
    for (kind, model), u in sorted(by_model.items()):
        cost = prices.usage_cost(
            kind, model, u.tokens_before, u.tokens_after, u.cached_tokens, u.completion_tokens
        )
        for c in cost.lines:
            if c.tokens <= 0:
                continue
            priced.append(
                PricedLine(
                    line_no=len(priced),
                    model=model,
                    kind=kind,
                    token_class=c.token_class,
                    priced_as=c.priced_as,
                    tokens=c.tokens,
                    price_per_million=c.price_per_million,
                    amount_minor=to_minor(c.amount) if to_cents else None,
                )
            )
    return tuple(priced)


# --- planning --------------------------------------------------------------------------------
def plan(
    unbilled: Iterable[Unbilled],
    accounts: Mapping[str, BillingAccount],
    config: PlanConfig,
    busy_accounts: frozenset[str] = frozenset(),
    unsubscribed: frozenset[str] = frozenset(),
) -> Plan:
    """Batches for the unbilled usage. Accounts that cannot be billed are reported in
    `skipped` and their usage stays unbilled. `busy_accounts` (invoice-items mode: accounts
    with a batch still pending) wait, so one invoice never sweeps up another batch's items.
    `unsubscribed` (meters mode: customers without an active subscription to the metered
    price, whose meter events Stripe would never invoice) wait too."""
    by_account: dict[str, list[Unbilled]] = {}
    for row in unbilled:
        if row.usage.billable(row.kind):
            by_account.setdefault(row.account_id, []).append(row)
    batches: list[Batch] = []
    skipped: list[Skipped] = []
    for account_id in sorted(by_account):
        rows = sorted(by_account[account_id], key=lambda r: (r.hour, r.seq, r.kind, r.model))
        account = accounts.get(account_id)
        made: list[Batch] = []
        reason: SkipReason
        if account is None:
            reason = "unknown-account"
        elif not account.stripe_customer_id:
            reason = "no-customer"
        elif config.mode == "invoice-items" and account_id in busy_accounts:
            reason = "pending-batch"
        elif config.mode == "meters" and account_id in unsubscribed:
            reason = "no-subscription"
        else:
            made = _batches(account_id, account.stripe_customer_id, rows, config)
            reason = "under-one-cent"
        batches.extend(made)
        covered = {(x.hour, x.model, x.kind) for b in made for x in b.lines}
        left = [r for r in rows if (r.hour, r.model, r.kind) not in covered]
        if left:
            hours = len({r.hour for r in left})
            tokens = sum(
                r.usage.tokens_before if r.kind == "compress" else r.usage.tokens_after
                + r.usage.completion_tokens
                for r in left
            )
            name = account.name if account else None
            skipped.append(Skipped(account_id, name, reason, hours, tokens))
    return Plan(tuple(batches), tuple(skipped))


def _as_line(r: Unbilled) -> Line:
    return Line(r.hour, r.seq, r.model, r.kind, r.usage)


def _batches(
    account_id: str, customer_id: str, rows: Sequence[Unbilled], config: PlanConfig
) -> list[Batch]:
    if config.mode == "meters":
        by_hour: dict[tuple[datetime, int], list[Line]] = {}
        for r in rows:
            by_hour.setdefault((r.hour, r.seq), []).append(_as_line(r))
        made = []
        for (hour, seq), lines in sorted(by_hour.items()):
            priced = price_lines(lines, config.prices, to_cents=False)
            value = to_micro(sum((x.amount for x in priced), Decimal(0)))
            if value <= 0:
                continue  # free or under a millionth so far: waits for more usage
            made.append(
                Batch(
                    batch_id=meter_identifier(account_id, hour, seq),
                    mode="meters",
                    account_id=account_id,
                    stripe_customer_id=customer_id,
                    period_start=hour,
                    period_end=hour + HOUR,
                    quantity=value,
                    amount_minor=None,
                    currency=config.currency,
                    meter_event_name=config.meter_event_name,
                    lines=tuple(lines),
                    priced=priced,
                )
            )
        return made
    lines = tuple(_as_line(r) for r in rows)
    priced = price_lines(lines, config.prices, to_cents=True)
    amount = sum(x.amount_minor or 0 for x in priced)
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
            quantity=sum(x.tokens for x in priced),
            amount_minor=amount,
            currency=config.currency,
            meter_event_name=None,
            lines=lines,
            priced=priced,
        )
    ]


def with_line_object(batch: Batch, line_no: int, stripe_object_id: str) -> Batch:
    """The batch after Stripe made the invoice item of line `line_no`."""
    priced = tuple(
        replace(x, stripe_object_id=stripe_object_id) if x.line_no == line_no else x
        for x in batch.priced
    )
    return replace(batch, priced=priced)


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
    """The hour's cost (in millionths) as one meter event, timestamped at the hour's start so
    that Stripe counts it in the billing period the hour belongs to."""
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
        "tokens": str(batch.tokens),
    }


_CLASS_LABEL = {
    "input": "input tokens",
    "cached_input": "cached input tokens",
    "output": "output tokens",
    "compress": "tokens compressed (/v1/compress)",
}


def line_description(batch: Batch, line: PricedLine) -> str:
    what = "ccproxy" if line.kind == "compress" else f"{line.model or 'unknown model'}"
    price = f"{line.price_per_million.normalize():f} {batch.currency.upper()}/M"
    return (
        f"{what}: {line.tokens:,} {_CLASS_LABEL[line.token_class]} at {price}, "
        f"{hour_label(batch.period_start)} to {hour_label(batch.period_end)}"
    )


def invoice_lines(batch: Batch) -> tuple[PricedLine, ...]:
    """The lines that become invoice items: those of at least one cent."""
    return tuple(x for x in batch.priced if (x.amount_minor or 0) > 0)


def invoice_item_request(batch: Batch, line: PricedLine) -> StripeRequest:
    # Built from the batch alone (not from settings), so a resend is the same request.
    assert batch.mode == "invoice-items" and line.amount_minor is not None
    params = {
        "customer": batch.stripe_customer_id,
        "amount": line.amount_minor,
        "currency": batch.currency,
        "description": line_description(batch, line),
        "period": {"start": _ts(batch.period_start), "end": _ts(batch.period_end)},
        "metadata": {
            **_metadata(batch),
            "ccproxy_line": str(line.line_no),
            "model": line.model[:200],
            "kind": line.kind,
            "token_class": line.token_class,
            "tokens": str(line.tokens),
            "price_per_million": str(line.price_per_million),
        },
    }
    return post_request("/v1/invoiceitems", params, f"{batch.batch_id}-item-{line.line_no}")


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


def priced_as_dict(line: PricedLine) -> dict[str, Any]:
    return {
        "line_no": line.line_no,
        "model": line.model,
        "kind": line.kind,
        "token_class": line.token_class,
        "priced_as": line.priced_as,
        "tokens": line.tokens,
        "price_per_million": str(line.price_per_million),
        "amount": str(line.amount),
        "amount_minor": line.amount_minor,
        "stripe_object_id": line.stripe_object_id,
    }


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
        "tokens": batch.tokens,
        "quantity": batch.quantity,
        "amount_minor": batch.amount_minor,
        "currency": batch.currency,
        "lines": [priced_as_dict(x) for x in batch.priced],
        "stripe_object_id": batch.stripe_object_id,
        "stripe_invoice_id": batch.stripe_invoice_id,
        "review_reason": batch.review_reason,
    }
