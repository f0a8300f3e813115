"""`python -m billing` in process: setup, customers, dry run, run; SQLite file database."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from billing.__main__ import main
from ccproxy.settings import Settings
from ccproxy.usage.store import SqliteStore
from tests.billing.fake_stripe import FakeStripe
from tests.billing.helpers import NOW, client, seed, subscribe_in_fake

Cli = Callable[..., tuple[int, str]]


@pytest.fixture
def settings(tmp_path: Path, fake_stripe: FakeStripe) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=None,
        stripe_api_key=SecretStr("sk_test_cli"),
        stripe_api_base=fake_stripe.url,
        billing_mode="meters",
    )


@pytest.fixture
def cli(settings: Settings, fake_stripe: FakeStripe, capsys: pytest.CaptureFixture[str]) -> Cli:
    def invoke(*argv: str, settings_: Settings = settings) -> tuple[int, str]:
        code = main(
            list(argv), settings_, client_factory=lambda s: client(fake_stripe.url), now=lambda: NOW
        )
        out, err = capsys.readouterr()
        return code, out + err

    return invoke


def _json(cli: Cli, *argv: str) -> Any:
    code, out = cli("--json", *argv)
    assert code == 0, out
    return json.loads(out)


def test_setup_creates_the_meter_product_and_price_once(cli: Cli, fake_stripe: FakeStripe) -> None:
    first = _json(cli, "setup")
    assert first["created"] == ["meter", "product", "price"]
    # The meter sums millionths of a dollar: 0.0001 cents each, whatever the price table says.
    assert first["unit_amount_decimal"] == "0.0001"
    (meter_call,) = fake_stripe.calls("POST", "/v1/billing/meters")
    assert meter_call.params == {
        "display_name": "ccproxy usage (millionths of the currency unit)",
        "event_name": "ccproxy_usage_micro",
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
        "value_settings": {"event_payload_key": "value"},
    }
    (price_call,) = fake_stripe.calls("POST", "/v1/prices")
    assert price_call.params["recurring"] == {
        "interval": "month",
        "usage_type": "metered",
        "meter": first["meter_id"],
    }
    assert price_call.params["lookup_key"] == "ccproxy_usage_micro"

    again = _json(cli, "setup")
    assert again["created"] == [] and again["price_id"] == first["price_id"]
    assert len([r for r in fake_stripe.requests if r.method == "POST"]) == 3


def test_setup_replaces_a_price_that_is_not_per_millionth(
    cli: Cli, settings: Settings, fake_stripe: FakeStripe
) -> None:
    first = _json(cli, "setup")
    # A per-token price left under the lookup key (e.g. by hand): setup makes a right one.
    old = fake_stripe.objects("price")[0]
    old["unit_amount_decimal"] = "0.00025"
    fake_stripe.expire_idempotency_keys()  # a later day
    code, out = cli("--json", "setup")
    second = json.loads(out)
    assert code == 0 and second["created"] == ["price"]
    assert second["price_id"] != first["price_id"] and second["unit_amount_decimal"] == "0.0001"
    assert "subscriptions on the old one keep it" in second["notes"][0]


def test_customers_set_create_subscribe_and_list(
    cli: Cli, settings: Settings, fake_stripe: FakeStripe
) -> None:
    store = SqliteStore(Path(settings.data_dir) / "ccproxy.sqlite")
    store.migrate()
    store.ensure_account("acme")
    store.ensure_account("beta")
    store.close()

    code, out = cli("customers", "set", "--account", "nobody", "--customer", "cus_1")
    assert code == 2 and "no account 'nobody'" in out
    code, out = cli("customers", "set", "--account", "beta", "--customer", "acct_x")
    assert code == 2 and "cus_" in out
    assert _json(cli, "customers", "set", "--account", "beta", "--customer", "cus_beta") == {
        "account": "beta",
        "stripe_customer_id": "cus_beta",
    }
    created = _json(
        cli, "customers", "set", "--account", "acme", "--create", "--email", "b@acme.test"
    )
    (customer,) = fake_stripe.objects("customer")
    assert created["stripe_customer_id"] == customer["id"]
    assert customer["name"] == "acme" and customer["email"] == "b@acme.test"
    assert customer["metadata"]["ccproxy_account_id"].startswith("acct_")
    # Creating again keeps the customer the account has.
    assert _json(cli, "customers", "set", "--account", "acme", "--create") == created
    assert len(fake_stripe.objects("customer")) == 1

    code, out = cli("customers", "subscribe", "--account", "acme")
    assert code == 1 and "run setup first" in out
    _json(cli, "setup")
    sub = _json(cli, "customers", "subscribe", "--account", "acme")
    assert sub["created"] is True
    assert _json(cli, "customers", "subscribe", "--account", "acme") == {**sub, "created": False}
    (call,) = fake_stripe.calls("POST", "/v1/subscriptions")
    assert call.params["customer"] == customer["id"] and "price" in call.params["items"]["0"]

    listing = _json(cli, "customers", "list")
    assert [(r["account"], r["stripe_customer_id"]) for r in listing] == [
        ("acme", customer["id"]),
        ("beta", "cus_beta"),
    ]


def test_dry_run_then_run_then_nothing_left(
    cli: Cli, settings: Settings, fake_stripe: FakeStripe
) -> None:
    store = SqliteStore(Path(settings.data_dir) / "ccproxy.sqlite")
    store.migrate()
    seed(store, "acme", {0: 1_000_000, 1: 3})
    seed(store, "beta", {0: 10})
    store.close()
    cli("customers", "set", "--account", "acme", "--customer", "cus_A")
    subscribe_in_fake(fake_stripe, "cus_A")

    code, out = cli("run", "--dry-run")
    assert code == 0
    assert "2 batch(es) would be sent; nothing was sent" in out
    assert "1,000,000 tokens  2.500000 USD (Stripe rounds the month)" in out
    assert "skipped    beta" in out and "no Stripe customer" in out
    assert fake_stripe.requests == []

    report = _json(cli, "run")
    assert report["ok"] and [o["status"] for o in report["outcomes"]] == ["sent", "sent"]
    assert [s["reason"] for s in report["skipped"]] == ["no-customer"]
    assert sorted(e["payload"]["value"] for e in fake_stripe.meter_events.values()) == [
        "2500000",  # 1,000,000 x 2.50 per million, in millionths
        "8",  # 3 x 2.50 = 7.5 millionths, rounded half-up
    ]

    code, out = cli("run")
    assert code == 0 and "nothing to bill" in out
    code, out = cli("status")
    assert code == 0 and "no pending or rejected batches" in out


def test_a_failed_run_exits_1_and_status_shows_the_pending_batch(
    cli: Cli, settings: Settings, fake_stripe: FakeStripe
) -> None:
    store = SqliteStore(Path(settings.data_dir) / "ccproxy.sqlite")
    store.migrate()
    seed(store, "acme", {0: 1_000_000})
    store.close()
    cli("customers", "set", "--account", "acme", "--customer", "cus_A")
    subscribe_in_fake(fake_stripe, "cus_A")
    fake_stripe.fail(500, times=10, path="/v1/billing/meter_events")
    code, out = cli("run")
    assert code == 1 and "failed" in out and "HTTP 500" in out
    code, out = cli("status")
    assert code == 0 and out.startswith("pending") and "last error: Stripe HTTP 500" in out


def test_a_run_without_an_api_key_is_a_configuration_error(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=None, stripe_api_key=None)
    assert main(["run"], settings) == 2
    assert main(["run", "--dry-run"], settings) == 0
    assert main(["run", "--since", "yesterday"], settings) == 2


def test_python_dash_m_billing_runs(tmp_path: Path) -> None:
    env = {"CCPROXY_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "billing", "--json", "run", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dry_run"] is True


def test_the_price_table_comes_from_the_settings_and_a_bad_one_is_a_usage_error(
    cli: Cli, settings: Settings, tmp_path: Path
) -> None:
    store = SqliteStore(Path(settings.data_dir) / "ccproxy.sqlite")
    store.migrate()
    seed(store, "acme", {0: 1_000_000}, model="gpt-4o", completion_tokens=1_000)
    store.close()
    cli("customers", "set", "--account", "acme", "--customer", "cus_A")
    table = tmp_path / "prices.toml"
    table.write_text(
        'default = {input = "1", output = "2"}\n'
        '[models."gpt-4o"]\ninput = "5.00"\ncached_input = "2.50"\noutput = "15.00"\n'
    )
    priced = settings.model_copy(update={"billing_prices": str(table)})
    code, out = cli("--json", "run", "--dry-run", settings_=priced)
    assert code == 0, out
    report = json.loads(out)
    (batch,) = report["planned"]
    # 1,000,000 x 5.00 + 2 events x 1,000 x 15.00 per million = 5.03 USD = 5,030,000 millionths
    assert batch["quantity"] == 5_030_000
    assert [(x["token_class"], x["priced_as"], x["tokens"]) for x in batch["lines"]] == [
        ("input", "gpt-4o", 1_000_000),
        ("output", "gpt-4o", 2_000),
    ]
    broken = settings.model_copy(update={"billing_prices": '{"models": {}}'})
    code, out = cli("run", "--dry-run", settings_=broken)
    assert code == 2 and "'default' row" in out


def test_review_resolves_a_held_meter_event(
    cli: Cli, settings: Settings, fake_stripe: FakeStripe
) -> None:
    from billing.ledger import BillingLedger

    store = SqliteStore(Path(settings.data_dir) / "ccproxy.sqlite")
    store.migrate()
    seed(store, "acme", {0: 1_000_000, 1: 1_000})
    cli("customers", "set", "--account", "acme", "--customer", "cus_A")
    subscribe_in_fake(fake_stripe, "cus_A")
    fake_stripe.fail(500, times=20, path="/v1/billing/meter_events")
    assert cli("run")[0] == 1
    ledger = BillingLedger(store)
    first, second = (b.batch_id for b in ledger.pending())
    ledger.hold_for_review(first, "past the window")
    ledger.hold_for_review(second, "past the window")
    code, out = cli("status")
    assert code == 0 and out.count("review") == 2 and "held: past the window" in out
    code, out = cli("review", "--batch", "nope", "--resend")
    assert code == 2 and "held for review" in out
    assert _json(cli, "review", "--batch", first, "--delivered")["result"] == "marked sent"
    assert cli("review", "--batch", second, "--resend")[0] == 0
    fake_stripe.faults.clear()
    report = _json(cli, "run")
    assert [(o["batch_id"], o["status"]) for o in report["outcomes"]] == [(second, "sent")]
    assert {r.state for r in ledger.batches()} == {"sent"}
    store.close()
