"""Fixtures of the billing tests: the usage tests' SQLite/Postgres backends (reused from
tests/usage/conftest.py, with the billing tables emptied too), the recording fake of Stripe,
and localstripe in a subprocess on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from billing.ledger import BillingLedger
from tests.billing.fake_stripe import FakeStripe
from tests.usage.conftest import (  # noqa: F401
    Backend,
    backend,
    fresh_store_factory,
    pg_databases,
    pg_url,
)
from tests.usage.helpers import free_port

BILLING_TABLES = ("ccproxy_billing_ledger", "ccproxy_billing_lines", "ccproxy_billing_batches")
LOCALSTRIPE = Path(__file__).with_name("localstripe_server.py")


@pytest.fixture
def db(backend: Backend) -> Backend:  # noqa: F811
    """A migrated store of each kind with no accounts, usage or ledger rows."""
    if backend.name == "postgres":
        backend.query(f"TRUNCATE {', '.join(BILLING_TABLES)}")
    return backend


@pytest.fixture
def ledger(db: Backend) -> BillingLedger:
    return BillingLedger(db.store)


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    fake = FakeStripe()
    yield fake
    fake.close()


@pytest.fixture(scope="session")
def localstripe_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        import localstripe  # noqa: F401
    except ImportError:  # a dev dependency: its absence is a broken install, not a skip
        pytest.fail("localstripe is not installed (pip install -e '.[dev]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("localstripe") / "output.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(LOCALSTRIPE), str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"localstripe exited: {log.read_text()[-2000:]}")
            try:
                r = httpx.get(f"{url}/v1/customers", auth=("sk_test_local", ""), timeout=1)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("localstripe did not start within 30 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
