"""Key checks against a real PostgreSQL store: the negative cache, the per-address budget of
failed keys, and the cap on how long a cached key outlives its database (a real outage: the
test database stops taking connections and its sessions are terminated)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ccproxy.auth import FailedAuthLimiter, KeyAuthenticator, KeyVerifier, issue_key
from ccproxy.protocol import ProxyError
from ccproxy.usage.store import PostgresStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """The real store; counts the lookups that reach it."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.lookups = 0

    def find_key(self, key_id: str):  # type: ignore[no-untyped-def]
        self.lookups += 1
        return self.store.find_key(key_id)


@pytest.fixture
def url(pg_databases) -> str:  # type: ignore[no-untyped-def]
    return str(pg_databases.create())


@pytest.fixture
def store(url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(url)
    store.migrate()
    yield store
    store.close()


def _new_key(store: PostgresStore) -> str:
    issued = issue_key()
    store.insert_key(issued.key_id, store.ensure_account("acme"), issued.key_hash, None)
    return issued.key


def _refusal(call) -> ProxyError:  # type: ignore[no-untyped-def]
    with pytest.raises(ProxyError) as caught:
        asyncio.run(call())
    return caught.value


def test_an_unknown_key_id_costs_one_lookup_until_it_is_forgotten(store: PostgresStore) -> None:
    counting, clock = CountingStore(store), Clock()
    verifier = KeyVerifier(counting.find_key, ttl_s=30, clock=clock, negative_ttl_s=30)
    bogus = issue_key().key  # well-shaped, never stored
    for _ in range(20):
        error = _refusal(lambda: verifier.verify(bogus))
        assert (error.status, error.code) == (401, "invalid_api_key")
    assert counting.lookups == 1
    clock.now += 31
    _refusal(lambda: verifier.verify(bogus))
    assert counting.lookups == 2  # forgotten after the TTL: asked again


def test_the_negative_cache_is_bounded(store: PostgresStore) -> None:
    counting = CountingStore(store)
    verifier = KeyVerifier(counting.find_key, ttl_s=30, negative_ttl_s=30, max_remembered=3)
    keys = [issue_key().key for _ in range(4)]
    for key in keys:
        _refusal(lambda: verifier.verify(key))
    _refusal(lambda: verifier.verify(keys[0]))  # pushed out by the fourth: looked up again
    assert counting.lookups == 5
    _refusal(lambda: verifier.verify(keys[3]))
    assert counting.lookups == 5


def test_a_key_created_after_its_id_was_refused_works_once_remembered_absence_ends(store: PostgresStore) -> None:
    clock = Clock()
    verifier = KeyVerifier(store.find_key, ttl_s=30, clock=clock, negative_ttl_s=5)
    issued = issue_key()
    _refusal(lambda: verifier.verify(issued.key))
    store.insert_key(issued.key_id, store.ensure_account("acme"), issued.key_hash, None)
    clock.now += 6
    assert asyncio.run(verifier.verify(issued.key)).account_name == "acme"


def test_failed_keys_from_one_address_are_refused_before_any_lookup(store: PostgresStore) -> None:
    counting, clock = CountingStore(store), Clock()
    verifier = KeyVerifier(counting.find_key, ttl_s=30, clock=clock)  # no negative cache: every try is a lookup
    gate = KeyAuthenticator(verifier, server_holds_upstream_key=False, failures=FailedAuthLimiter(5, clock))
    good = _new_key(store)
    asyncio.run(gate.admit({"x-api-key": good}, "10.0.0.1"))  # verified and cached
    for _ in range(5):
        assert _refusal(lambda: gate.admit({"x-api-key": issue_key().key}, "10.0.0.9")).status == 401
    lookups = counting.lookups
    refused = _refusal(lambda: gate.admit({"x-api-key": issue_key().key}, "10.0.0.9"))
    assert (refused.status, refused.code, refused.headers) == (429, "too_many_failed_auth", {"retry-after": "12"})
    assert set(refused.body()["error"]) == {"message", "type", "param", "code"}
    assert counting.lookups == lookups  # refused without asking the database
    # A key the cache vouches for still passes from that address; other addresses are untouched.
    assert asyncio.run(gate.admit({"x-api-key": good}, "10.0.0.9")).account_name == "acme"
    assert _refusal(lambda: gate.admit({"x-api-key": issue_key().key}, "10.0.0.2")).status == 401
    clock.now += 12  # one failure refilled
    assert _refusal(lambda: gate.admit({"x-api-key": issue_key().key}, "10.0.0.9")).status == 401
    assert _refusal(lambda: gate.admit({"x-api-key": issue_key().key}, "10.0.0.9")).status == 429


def _outage(url: str, on: bool) -> None:
    """Stop (or restore) every connection to the test database, as a database outage would."""
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if on else "false"}')
        if not on:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def test_a_revoked_key_outlives_an_outage_only_for_the_stale_cap(store: PostgresStore, url: str) -> None:
    clock = Clock()
    verifier = KeyVerifier(store.find_key, ttl_s=30, clock=clock, max_stale_s=120)
    key = _new_key(store)
    assert asyncio.run(verifier.verify(key)).account_name == "acme"
    assert store.revoke_key(key.split("_")[1])
    _outage(url, on=False)
    try:
        clock.now += 60  # cache expired, database down: the stale row still serves
        assert asyncio.run(verifier.verify(key)).account_name == "acme"
        clock.now += 61  # 121 s since the last successful check
        error = _refusal(lambda: verifier.verify(key))
        assert (error.status, error.code, error.type) == (503, "key_store_unavailable", "server_error")
    finally:
        _outage(url, on=True)
    assert _refusal(lambda: verifier.verify(key)).code == "revoked_api_key"
