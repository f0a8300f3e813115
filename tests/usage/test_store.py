from __future__ import annotations

import hashlib
import random
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from ccproxy.usage.events import TOTAL_FIELDS, HourlyTotals, UsageEvent, hour_of
from ccproxy.usage.store import PostgresStore, SqliteStore, StoreUnavailable, open_store
from tests.usage.conftest import Backend
from tests.usage.helpers import BASE, TABLES, free_port, make_event, spread_events

# Wide enough for every event the tests write (spread_events: one every 17 minutes).
DAY = (BASE - timedelta(days=1), BASE + timedelta(days=30))


def _sum(rows: list[HourlyTotals], account_id: str) -> HourlyTotals:
    columns = zip(*(r.counts() for r in rows), strict=True)
    return HourlyTotals(account_id, DAY[0], *map(sum, columns))


def _expected_hourly(events: list[UsageEvent], account_id: str) -> dict[datetime, tuple[int, ...]]:
    hours: dict[datetime, list[int]] = {}
    for e in events:
        if e.account_id == account_id:
            row = hours.setdefault(hour_of(e.created_at), [0] * len(TOTAL_FIELDS))
            for i, value in enumerate(e.counts()):
                row[i] += value
    return {hour: tuple(row) for hour, row in hours.items()}


def _hourly_map(backend: Backend, account_id: str) -> dict[datetime, tuple[int, ...]]:
    return {r.hour: r.counts() for r in backend.store.hourly(account_id, *DAY)}


def test_write_events_counts_hourly_totals(backend: Backend) -> None:
    events = spread_events(40)
    assert backend.store.write_events(events) == 40
    assert backend.store.count_events() == 40
    for account in ("acct_a", "acct_b"):
        assert _hourly_map(backend, account) == _expected_hourly(events, account)
        assert backend.store.event_totals(account, *DAY) == _sum(
            backend.store.hourly(account, *DAY), account
        )
    hours = [r.hour for r in backend.store.hourly("acct_a", *DAY)]
    assert hours == sorted(hours) and all(h.tzinfo is not None and h.minute == 0 for h in hours)


def test_replaying_a_batch_changes_nothing(backend: Backend) -> None:
    events = spread_events(30)
    assert backend.store.write_events(events) == 30
    before = (_hourly_map(backend, "acct_a"), _hourly_map(backend, "acct_b"))
    for _ in range(3):
        assert backend.store.write_events(events) == 0
    assert backend.store.count_events() == 30
    assert (_hourly_map(backend, "acct_a"), _hourly_map(backend, "acct_b")) == before


def test_overlapping_batches_count_each_event_once(backend: Backend) -> None:
    events = spread_events(50)
    assert backend.store.write_events(events[:30]) == 30
    assert backend.store.write_events(events[20:]) == 20  # 10 already there
    shuffled = events[:]
    random.Random(7).shuffle(shuffled)
    assert backend.store.write_events(shuffled + shuffled[:5]) == 0  # duplicates within a batch too
    assert backend.store.count_events() == 50
    assert backend.store.count_events([e.event_id for e in events[45:]] + ["missing"]) == 5
    for account in ("acct_a", "acct_b"):
        assert _hourly_map(backend, account) == _expected_hourly(events, account)


def test_large_batch_spans_several_statements(backend: Backend) -> None:
    events = spread_events(1203, accounts=("acct_a", "acct_b", "acct_c"))
    assert backend.store.write_events(events) == 1203
    assert backend.store.write_events(events) == 0
    assert backend.store.count_events([e.event_id for e in events]) == 1203
    for account in ("acct_a", "acct_b", "acct_c"):
        assert backend.store.event_totals(account, *DAY) == _sum(
            backend.store.hourly(account, *DAY), account
        )


def test_concurrent_writers_of_the_same_events_count_them_once(backend: Backend) -> None:
    events = spread_events(200)
    stores = [backend.new_store() for _ in range(3)]
    barrier = threading.Barrier(len(stores))
    inserted: list[int] = []
    errors: list[BaseException] = []

    def run(store) -> None:  # type: ignore[no-untyped-def]
        try:
            barrier.wait()
            inserted.append(store.write_events(events))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sum(inserted) == 200
    assert _hourly_map(backend, "acct_a") == _expected_hourly(events, "acct_a")


def test_hourly_range_is_half_open(backend: Backend) -> None:
    backend.store.write_events(
        [make_event(created_at=BASE + timedelta(hours=h, minutes=30)) for h in range(5)]
    )
    rows = backend.store.hourly("acct_a", BASE + timedelta(hours=1), BASE + timedelta(hours=3))
    assert [r.hour for r in rows] == [BASE + timedelta(hours=1), BASE + timedelta(hours=2)]
    assert backend.store.hourly("acct_other", *DAY) == []
    assert backend.store.event_totals("acct_other", *DAY).requests == 0
    assert backend.store.write_events([]) == 0


def test_accounts_are_got_or_created(backend: Backend) -> None:
    first = backend.store.ensure_account("acme")
    assert first.startswith("acct_")
    assert backend.store.ensure_account("acme") == first
    assert backend.store.ensure_account("other") != first
    account = backend.store.account_by_name("acme")
    assert account is not None and account.id == first and account.stripe_customer_id is None
    assert account.created_at.tzinfo is not None
    assert backend.store.account_by_name("nobody") is None
    with pytest.raises(ValueError):
        backend.store.ensure_account("")


def test_keys_insert_find_list_revoke(backend: Backend) -> None:
    store = backend.store
    acme, other = store.ensure_account("acme"), store.ensure_account("other")
    raw = "ccp_live_" + "s3cret" * 6
    digest = hashlib.sha256(raw.encode()).hexdigest()
    store.insert_key("key_a", acme, digest, "laptop")
    store.insert_key("key_b", acme, hashlib.sha256(b"b").hexdigest(), None)
    store.insert_key("key_c", other, hashlib.sha256(b"c").hexdigest(), "ci")

    found = store.find_key("key_a")
    assert found is not None
    assert (found.account_id, found.account_name, found.label) == (acme, "acme", "laptop")
    assert found.key_hash == digest
    assert found.created_at.tzinfo is not None and not found.revoked
    assert store.find_key("key_missing") is None
    assert [k.key_id for k in store.list_keys("acme")] == ["key_a", "key_b"]
    assert sorted(k.key_id for k in store.list_keys()) == ["key_a", "key_b", "key_c"]
    assert store.list_keys("nobody") == []

    assert store.revoke_key("key_a") is True
    assert store.revoke_key("key_a") is False
    assert store.revoke_key("key_missing") is False
    revoked = store.find_key("key_a")
    assert revoked is not None and revoked.revoked_at is not None
    assert revoked.revoked and revoked.revoked_at >= revoked.created_at
    live = store.find_key("key_b")
    assert live is not None and not live.revoked

    # The key itself is nowhere in the database, only its digest.
    dump = repr([backend.query(f"SELECT * FROM {t}") for t in TABLES])
    assert digest in dump and raw not in dump and "s3cret" not in dump


def test_insert_key_refuses_what_is_not_a_digest_or_an_unknown_account(backend: Backend) -> None:
    acme = backend.store.ensure_account("acme")
    with pytest.raises(ValueError, match="SHA-256"):
        backend.store.insert_key("key_raw", acme, "ccp_live_plaintext", None)
    with pytest.raises(ValueError, match="SHA-256"):
        backend.store.insert_key("key_upper", acme, "A" * 64, None)
    digest = hashlib.sha256(b"x").hexdigest()
    backend.store.insert_key("key_x", acme, digest, None)
    with pytest.raises(ValueError, match="not stored"):
        backend.store.insert_key("key_x", acme, digest, None)
    with pytest.raises(ValueError, match="not stored"):
        backend.store.insert_key("key_y", "acct_missing", digest, None)
    # The store is still usable after a refused write.
    assert backend.store.find_key("key_x") is not None


def test_database_check_refuses_a_raw_key(backend: Backend) -> None:
    acme = backend.store.ensure_account("acme")
    now = "2024-05-01T10:00:00.000000Z"
    with pytest.raises(Exception, match="(?i)check"):
        backend.query(
            "INSERT INTO ccproxy_api_keys (key_id, account_id, key_hash, created_at) "
            f"VALUES ('k', '{acme}', 'ccp_live_plaintext', '{now}')"
        )


def test_unreachable_postgres_raises_store_unavailable() -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    with pytest.raises(StoreUnavailable, match="postgres unavailable"):
        store.write_events([make_event()])
    with pytest.raises(StoreUnavailable):
        store.hourly("acct_a", *DAY)
    with pytest.raises(StoreUnavailable):
        store.ensure_account("acme")
    store.close()


def test_postgres_reconnects_after_losing_its_connection(pg_url: str) -> None:
    import psycopg

    store = PostgresStore(pg_url)
    account = f"acct_{random.getrandbits(64):x}"
    assert store.write_events([make_event(account)]) == 1

    def kill_backends() -> None:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            # In the select list, not the WHERE clause: only the filtered rows are terminated.
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'ccproxy'"
            ).fetchall()
            assert killed == [(True,)]

    kill_backends()
    assert store.hourly(account, *DAY)[0].requests == 1  # a read retries on a new connection
    kill_backends()
    assert store.write_events([make_event(account)]) == 1  # nothing sent yet: BEGIN retried
    assert store.event_totals(account, *DAY).requests == 2
    store.close()


def test_open_store_picks_the_backend_from_settings(tmp_path: Path) -> None:
    from pydantic import SecretStr

    from ccproxy.settings import Settings

    store = open_store(Settings(data_dir=tmp_path / "data"))
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "data" / "ccproxy.sqlite"
    store.migrate()
    assert store.path.exists()
    store.close()
    url = "postgresql://ccproxy:hunter2@db.example.invalid:6543/postgres"
    remote = open_store(Settings(database_url=SecretStr(url), data_dir=tmp_path))
    assert isinstance(remote, PostgresStore) and "hunter2" not in repr(remote)
