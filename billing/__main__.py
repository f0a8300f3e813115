"""``python -m billing``: report usage to Stripe.

    python -m billing setup                                  # meter + metered price, once
    python -m billing customers set --account acme --create [--email billing@acme.test]
    python -m billing customers set --account acme --customer cus_123
    python -m billing customers subscribe --account acme     # meters mode: subscribe to the price
    python -m billing customers list
    python -m billing run --dry-run                          # what would be billed
    python -m billing run [--mode invoice-items] [--since 2026-11-01] [--until 2026-12-01]
    python -m billing status                                 # pending, held and rejected batches
    python -m billing review --batch ID --delivered|--resend # resolve a batch held for review

Reads the same database as the Gateway (CCPROXY_DATABASE_URL or the SQLite file) and the
CCPROXY_BILLING_* / CCPROXY_STRIPE_* settings. Exit status: 0 all billed (accounts without a
Stripe customer are reported, not failed), 1 something was not billed and needs a look,
2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime, timezone
from typing import Any

from billing import catalog
from billing.job import (
    MODES,
    Batch,
    BillingAccount,
    as_dict,
    format_micro,
    format_minor,
    hour_label,
)
from billing.ledger import BillingLedger
from billing.runner import RunConfig, RunReport, run
from billing.stripe_client import StripeClient, StripeError
from ccproxy.pricing import PriceTableError
from ccproxy.settings import Settings
from ccproxy.usage.store import SqlStore, open_store

ClientFactory = Callable[[Settings], StripeClient]


class UsageError(Exception):
    """A mistake in the command or the configuration (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m billing", description=doc.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    commands = parser.add_subparsers(dest="command", required=True)

    run_ = commands.add_parser("run", help="bill the closed hours not billed yet")
    run_.add_argument(
        "--dry-run", action="store_true", help="print what would be billed; send nothing"
    )
    run_.add_argument("--mode", choices=MODES, default=None, help="override CCPROXY_BILLING_MODE")
    run_.add_argument(
        "--since", default=None, help="first hour to consider (ISO date or time, UTC)"
    )
    run_.add_argument(
        "--until", default=None, help="bill hours before this (ISO date or time, UTC)"
    )

    commands.add_parser(
        "setup", help="create the Stripe meter, product and metered price (idempotent)"
    )
    commands.add_parser("status", help="list batches that are pending, held or rejected")
    review = commands.add_parser(
        "review", help="resolve a batch held for review (a meter event past Stripe's window)"
    )
    review.add_argument("--batch", required=True, help="the batch id (from `status`)")
    verdict = review.add_mutually_exclusive_group(required=True)
    verdict.add_argument(
        "--delivered", action="store_true", help="Stripe has it: mark the batch sent"
    )
    verdict.add_argument(
        "--resend", action="store_true", help="Stripe does not have it: resend on the next run"
    )

    customers = commands.add_parser("customers", help="Stripe customers of accounts")
    sub = customers.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="accounts and their Stripe customer ids")
    set_ = sub.add_parser("set", help="attach a Stripe customer to an account")
    set_.add_argument("--account", required=True, help="account name")
    how = set_.add_mutually_exclusive_group(required=True)
    how.add_argument("--customer", help="an existing Stripe customer id (cus_...)")
    how.add_argument("--create", action="store_true", help="create the customer in Stripe")
    set_.add_argument("--email", default=None, help="with --create: the customer's billing email")
    subscribe = sub.add_parser(
        "subscribe", help="subscribe the account's customer to the metered price"
    )
    subscribe.add_argument("--account", required=True, help="account name")
    return parser


def _when(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    value = text.strip()
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
        if value[-1:] in ("Z", "z"):
            value = value[:-1] + "+00:00"
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--{name}: expected an ISO date or time, got {text!r}") from None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed


def default_client(settings: Settings) -> StripeClient:
    if settings.stripe_api_key is None:
        raise UsageError("CCPROXY_STRIPE_API_KEY is not set")
    return StripeClient(
        settings.stripe_api_key.get_secret_value(),
        settings.stripe_api_base,
        max_retries=settings.billing_max_retries,
        timeout_s=settings.billing_timeout_s,
    )


def main(
    argv: Sequence[str] | None = None,
    settings: Settings | None = None,
    *,
    client_factory: ClientFactory = default_client,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> int:
    args = _parser().parse_args(argv)
    settings = settings or Settings()
    store = open_store(settings)
    client: StripeClient | None = None
    try:
        if not isinstance(store, SqlStore):
            raise UsageError("the billing ledger needs the SQL store")
        store.migrate()
        ledger = BillingLedger(store)

        def stripe() -> StripeClient:
            nonlocal client
            client = client or client_factory(settings)
            return client

        return _dispatch(args, settings, ledger, stripe, now)
    except (UsageError, PriceTableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StripeError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
        store.close()


def _dispatch(
    args: argparse.Namespace,
    settings: Settings,
    ledger: BillingLedger,
    stripe: Callable[[], StripeClient],
    now: Callable[[], datetime],
) -> int:
    if args.command == "run":
        config = RunConfig.from_settings(settings, args.mode)
        report = run(
            ledger,
            None if args.dry_run else stripe(),
            config,
            now(),
            dry_run=args.dry_run,
            since=_when(args.since, "since"),
            until=_when(args.until, "until"),
        )
        _emit(args.json, _report_json(report), _report_text(report, config))
        return 0 if report.ok else 1
    if args.command == "setup":
        result = catalog.setup(stripe(), _catalog_config(settings))
        data = {
            "meter_id": result.meter_id,
            "product_id": result.product_id,
            "price_id": result.price_id,
            "unit_amount_decimal": result.unit_amount_decimal,
            "created": list(result.created),
            "notes": list(result.notes),
        }
        lines = [
            f"meter   {result.meter_id} (event name {settings.billing_meter_event_name})",
            f"product {result.product_id}",
            f"price   {result.price_id}: {result.unit_amount_decimal} cents per unit (a "
            f"millionth of a {settings.billing_currency.upper()}), metered, monthly; meter "
            "event values are priced with the price table (CCPROXY_BILLING_PRICES)",
            "created: " + (", ".join(result.created) or "nothing (all were there)"),
            *(f"note: {n}" for n in result.notes),
        ]
        _emit(args.json, data, "\n".join(lines))
        return 0
    if args.command == "status":
        records = [*ledger.batches(state="pending"), *ledger.batches(state="rejected")]
        rows = [
            {
                **as_dict(r.batch),
                "state": r.state,
                "last_error": r.last_error,
                "created_at": r.created_at.isoformat(),
            }
            for r in records
        ]
        text = "\n".join(
            f"{'review' if r['review_reason'] else r['state']:8} {r['batch_id']}  "
            f"{r['account_id']}  {r['tokens']:,} tokens"
            + (f"  held: {r['review_reason']}" if r["review_reason"] else "")
            + (f"  last error: {r['last_error']}" if r["last_error"] else "")
            for r in rows
        )
        _emit(args.json, rows, text or "no pending or rejected batches")
        return 0
    if args.command == "review":
        return _review(args, ledger)
    return _customers(args, settings, ledger, stripe)


def _customers(
    args: argparse.Namespace,
    settings: Settings,
    ledger: BillingLedger,
    stripe: Callable[[], StripeClient],
) -> int:
    if args.action == "list":
        accounts = sorted(ledger.accounts().values(), key=lambda a: a.name)
        rows = [
            {"account": a.name, "account_id": a.id, "stripe_customer_id": a.stripe_customer_id}
            for a in accounts
        ]
        text = "\n".join(f"{a.name:24} {a.stripe_customer_id or '-'}" for a in accounts)
        _emit(args.json, rows, text or "no accounts")
        return 0
    account = _account(ledger, args.account)
    if args.action == "set":
        if args.create:
            customer_id = catalog.create_customer(stripe(), ledger, account, args.email)
        else:
            customer_id = args.customer.strip()
            if not customer_id.startswith("cus_"):
                raise UsageError(
                    f"--customer: a Stripe customer id starts with cus_, got {customer_id!r}"
                )
            ledger.set_customer(account.name, customer_id)
        attached = {"account": account.name, "stripe_customer_id": customer_id}
        _emit(args.json, attached, f"account {account.name!r} -> Stripe customer {customer_id}")
        return 0
    if not account.stripe_customer_id:
        raise UsageError(f"account {account.name!r} has no Stripe customer: customers set first")
    subscription_id, created = catalog.subscribe(
        stripe(), account.stripe_customer_id, settings.billing_price_lookup_key
    )
    subscribed = {"account": account.name, "subscription_id": subscription_id, "created": created}
    verb = "subscribed" if created else "already subscribed"
    _emit(args.json, subscribed, f"account {account.name!r} {verb}: {subscription_id}")
    return 0


def _review(args: argparse.Namespace, ledger: BillingLedger) -> int:
    held = [
        r
        for r in ledger.batches(state="pending")
        if r.batch.batch_id == args.batch and r.batch.review_reason
    ]
    if not held:
        raise UsageError(f"no batch {args.batch!r} is held for review (see `status`)")
    if args.delivered:
        ledger.mark_sent(args.batch, stripe_object_id=held[0].batch.batch_id)
        verdict = "marked sent"
    else:
        ledger.release_for_resend(args.batch)
        verdict = "released: the next run resends it"
    _emit(args.json, {"batch_id": args.batch, "result": verdict}, f"{args.batch}: {verdict}")
    return 0


def _account(ledger: BillingLedger, name: str) -> BillingAccount:
    account = ledger.account(name)
    if account is None:
        raise UsageError(
            f"no account {name!r} (python -m ccproxy keys create --account creates one)"
        )
    return account


def _catalog_config(settings: Settings) -> catalog.CatalogConfig:
    return catalog.CatalogConfig(
        meter_event_name=settings.billing_meter_event_name,
        price_lookup_key=settings.billing_price_lookup_key,
        currency=settings.billing_currency.lower(),
    )


def _emit(as_json: bool, data: Any, text: str) -> None:
    print(json.dumps(data) if as_json else text)


# --- the run's report ------------------------------------------------------------------------
def _report_json(report: RunReport) -> dict[str, Any]:
    return {
        "mode": report.mode,
        "dry_run": report.dry_run,
        "from": report.start.isoformat(),
        "to": report.end.isoformat(),
        "pending_at_start": [as_dict(b) for b in report.pending],
        "planned": [as_dict(b) for b in report.plan.batches],
        "skipped": [
            {
                "account_id": s.account_id,
                "account": s.account_name,
                "reason": s.reason,
                "hours": s.hours,
                "tokens": s.tokens,
            }
            for s in report.plan.skipped
        ],
        "outcomes": [
            {**as_dict(o.batch), "status": o.status, "resumed": o.resumed, "error": o.error}
            for o in report.outcomes
        ],
        "aborted": report.aborted,
        "ok": report.ok,
    }


_REASONS = {
    "no-customer": "no Stripe customer (python -m billing customers set)",
    "unknown-account": "the account id is not in ccproxy_accounts",
    "under-one-cent": "less than one cent so far; billed when it adds up",
    "pending-batch": "an earlier batch is still pending; billed after it goes through",
    "no-subscription": "no active subscription to the metered price "
    "(python -m billing customers subscribe); Stripe would not invoice it",
}


def _period(batch: Batch) -> str:
    hours = int((batch.period_end - batch.period_start).total_seconds() // 3600)
    if hours == 1:
        return f"hour {hour_label(batch.period_start)}"
    return f"{hour_label(batch.period_start)} to {hour_label(batch.period_end)}"


def _report_text(report: RunReport, config: RunConfig) -> str:
    out = [
        f"billing {'dry run' if report.dry_run else 'run'} ({report.mode}): closed hours "
        f"{hour_label(report.start)} to {hour_label(report.end)}"
    ]
    if report.pending:
        verb = "would resend" if report.dry_run else "resumed"
        out.append(f"{verb} {len(report.pending)} pending batch(es) from an earlier run")
    batches = report.plan.batches if report.dry_run else [o.batch for o in report.outcomes]
    statuses = {o.batch.batch_id: o for o in report.outcomes}
    for b in batches:
        outcome = statuses.get(b.batch_id)
        status = "would send" if outcome is None else outcome.status
        if b.amount_minor is not None:
            money = format_minor(b.amount_minor, b.currency)
        else:
            money = f"{format_micro(b.quantity, b.currency)} (Stripe rounds the month)"
        name = report.account_names.get(b.account_id, b.account_id)
        out.append(
            f"  {status:10} {name} ({b.stripe_customer_id})  {_period(b)}  "
            f"{b.tokens:,} tokens  {money}"
            + (f"  error: {outcome.error}" if outcome and outcome.error else "")
        )
        for x in b.priced:
            money_line = (
                format_minor(x.amount_minor, b.currency)
                if x.amount_minor is not None
                else f"{x.amount.normalize():f} {b.currency.upper()}"
            )
            what = "compression" if x.kind == "compress" else (x.model or "(no model)")
            out.append(
                f"      {what} {x.token_class}: {x.tokens:,} x {x.price_per_million:f}/M "
                f"({x.priced_as}) = {money_line}"
            )
    for s in report.plan.skipped:
        who = s.account_name or s.account_id
        tokens = f"{s.hours} hour(s), {s.tokens:,} tokens"
        out.append(f"  skipped    {who}: {tokens}: {_REASONS[s.reason]}")
    counts: dict[str, int] = {}
    for o in report.outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    if report.dry_run:
        out.append(f"{len(report.plan.batches)} batch(es) would be sent; nothing was sent")
    else:
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        out.append(summary or "nothing to bill")
    if report.aborted:
        out.append(f"aborted: {report.aborted}")
    return "\n".join(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
