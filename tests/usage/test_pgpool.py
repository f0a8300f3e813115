"""The pooled PostgreSQL store (the request path's): calls do not queue behind one another,
broken connections are replaced, an unreachable server is StoreUnavailable. Real PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from ccproxy.usage.pgpool import PooledPostgresStore
from ccproxy.usage.store import StoreUnavailable
from tests.usage.helpers import BASE, free_port, make_event

DAY = (BASE - timedelta(hours=1), BASE + timedelta(days=1))


def test_a_blocked_read_does_not_hold_up_the_others(pg_url: str) -> None:
    import psycopg

    store = PooledPostgresStore(pg_url, pool_size=3)
    store.write_events([make_event("acct_pool")])
    done: list[int] = []
    with psycopg.connect(pg_url) as admin:  # a transaction that keeps the hourly table locked
        admin.execute("LOCK TABLE ccproxy_usage_hourly IN ACCESS EXCLUSIVE MODE")
        slow = threading.Thread(target=lambda: done.append(len(store.hourly("acct_pool", *DAY))))
        slow.start()
        time.sleep(0.3)
        assert done == []  # waiting on the lock, holding one connection
        started = time.monotonic()
        assert store.find_key("no-such-key") is None  # served by another connection
        assert store.count_events() >= 1
        assert time.monotonic() - started < 2.0
        admin.rollback()
    slow.join(10)
    assert done == [1]
    store.close()


def test_the_pool_replaces_connections_the_server_killed(pg_url: str) -> None:
    import psycopg

    store = PooledPostgresStore(pg_url, pool_size=2)
    account = f"acct_pool_{time.monotonic_ns()}"
    assert store.write_events([make_event(account)]) == 1

    def kill_backends() -> None:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'ccproxy' "
                "AND pid <> pg_backend_pid()"
            ).fetchall()
            assert killed and all(ok for (ok,) in killed)

    kill_backends()
    assert store.hourly(account, *DAY)[0].requests == 1
    kill_backends()
    assert store.write_events([make_event(account)]) == 1
    assert store.event_totals(account, *DAY).requests == 2
    store.close()


def test_an_unreachable_server_is_store_unavailable() -> None:
    store = PooledPostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", connect_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="postgres unavailable"):
        store.find_key("k")
    with pytest.raises(StoreUnavailable):
        store.write_events([make_event()])
    assert time.monotonic() - started < 5.0
    store.close()


def test_open_store_pools_when_asked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    from ccproxy.settings import Settings
    from ccproxy.usage.store import PostgresStore, open_store

    settings = Settings(database_url=SecretStr("postgresql://u:pw@db.example.invalid/x"), data_dir=tmp_path)
    pooled = open_store(settings, pool_size=4)
    assert isinstance(pooled, PooledPostgresStore) and pooled.pool_size == 4
    assert type(open_store(settings)) is PostgresStore
    assert "pw" not in repr(pooled)
