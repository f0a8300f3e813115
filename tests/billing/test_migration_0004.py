"""Migration 0004 on a database that already holds usage and a billed ledger (SQLite and a
real PostgreSQL): past billing stays settled, unbilled legacy usage is billed by the default
row, and events written to the outbox by the previous version still decode."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

from billing.ledger import BillingLedger
from billing.runner import run
from ccproxy.usage.events import UsageEvent
from ccproxy.usage.migrate import load_migrations
from ccproxy.usage.store import SqlStore
from tests.billing.fake_stripe import FakeStripe
from tests.billing.helpers import NOW, at, client, config, subscribe_in_fake
from tests.usage.helpers import Query, make_event


def _migrate_until_0004(query: Query, dialect: str) -> None:
    query(
        "CREATE TABLE ccproxy_schema_migrations (version text PRIMARY KEY, applied_at text)"
        if dialect == "sqlite"
        else "CREATE TABLE ccproxy_schema_migrations "
        "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for migration in load_migrations(dialect):  # type: ignore[arg-type]
        if migration.version >= "0004":
            break
        for statement in migration.statements():
            query(statement)
        query(
            "INSERT INTO ccproxy_schema_migrations (version, applied_at) "
            f"VALUES ('{migration.version}', '2024-05-01T00:00:00.000000Z')"
        )


def test_upgrading_keeps_past_bills_settled_and_bills_the_rest_once(
    fresh_store_factory: tuple[str, Callable[[], SqlStore], Query], fake_stripe: FakeStripe
) -> None:
    dialect, new_store, query = fresh_store_factory
    _migrate_until_0004(query, dialect)
    ts = (lambda h: f"'{at(h):%Y-%m-%dT%H:%M:%S.000000Z}'") if dialect == "sqlite" else (
        lambda h: f"'{at(h).isoformat()}'"
    )
    # Hour 0 was billed under the old rule (tokens_after at one price); hour 1 was not.
    query(
        "INSERT INTO ccproxy_accounts (id, name, stripe_customer_id, created_at) "
        f"VALUES ('acct_old', 'old', 'cus_A', {ts(0)})"
    )
    for hour, completion in ((0, 5_000), (1, 7_000)):
        query(
            "INSERT INTO ccproxy_usage_hourly (account_id, hour, requests, tokens_before, "
            "tokens_after, tokens_saved, prompt_tokens, completion_tokens, updated_at) "
            f"VALUES ('acct_old', {ts(hour)}, 3, 2000000, 1000000, 1000000, 1000000, "
            f"{completion}, {ts(hour)})"
        )
    query(
        "INSERT INTO ccproxy_billing_batches (batch_id, mode, account_id, stripe_customer_id, "
        "period_start, period_end, quantity, currency, meter_event_name, state, "
        "stripe_object_id, created_at, sent_at) VALUES ('ccproxy-acct_old-20240501T10-0', "
        f"'meters', 'acct_old', 'cus_A', {ts(0)}, {ts(1)}, 1000000, 'usd', "
        f"'ccproxy_tokens_after', 'sent', 'ccproxy-acct_old-20240501T10-0', {ts(1)}, {ts(1)})"
    )
    query(
        "INSERT INTO ccproxy_billing_ledger (account_id, hour, seq, tokens_after, batch_id) "
        f"VALUES ('acct_old', {ts(0)}, 0, 1000000, 'ccproxy-acct_old-20240501T10-0')"
    )

    store = new_store()
    store.migrate()
    ledger = BillingLedger(store)
    # Hour 0: settled, completion tokens included. Hour 1: everything, at the default row.
    (left,) = ledger.unbilled(at(0), at(4))
    assert (left.hour, left.seq, left.model, left.kind) == (at(1), 0, "", "chat")
    assert (left.usage.tokens_after, left.usage.completion_tokens) == (1_000_000, 7_000)
    (old,) = ledger.batches()
    assert old.state == "sent" and old.batch.priced == () and old.batch.lines[0].model == ""

    # New usage in hour 0 after the upgrade is billed as the hour's next report, per model.
    store.write_events([make_event("acct_old", created_at=at(0), model="gpt-4o")])
    subscribe_in_fake(fake_stripe, "cus_A")
    with client(fake_stripe.url) as stripe:
        report = run(ledger, stripe, config(), NOW)
    got = sorted((o.batch.batch_id, o.batch.quantity) for o in report.outcomes)
    # hour 0, seq 1: gpt-4o 400 x 5.00 + 25 x 15.00 = 2,375 millionths
    # hour 1, seq 0: default row 1,000,000 x 2.50 + 7,000 x 10.00 = 2,570,000 millionths
    assert got == [
        ("ccproxy-acct_old-20240501T10-1", 2_375),
        ("ccproxy-acct_old-20240501T11-0", 2_570_000),
    ]
    with client(fake_stripe.url) as stripe:
        assert run(ledger, stripe, config(), NOW + timedelta(hours=1)).outcomes == []


def test_an_event_from_the_previous_version_decodes_with_the_new_defaults() -> None:
    current = json.loads(make_event().to_json())
    del current["cached_tokens"], current["kind"]
    old = UsageEvent.from_json(json.dumps(current))
    assert (old.cached_tokens, old.kind) == (None, "chat")
    assert old.hourly_counts()[-1] == 0
    new = make_event(cached_tokens=900, tokens_after=400, kind="compress")
    assert UsageEvent.from_json(new.to_json()) == new
    assert new.billable_cached_tokens() == 400  # never more than the prompt billed
