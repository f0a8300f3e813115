"""API keys without a database: shape, hashing, which header carries the key, the cache."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest

from ccproxy.auth import KeyVerifier, hash_key, issue_key, key_id_of, presented_key
from ccproxy.protocol import ProxyError
from ccproxy.upstream import upstream_request_headers


@dataclass(frozen=True)
class Row:
    key_id: str
    account_id: str
    account_name: str
    key_hash: str
    revoked_at: object | None = None


class Table:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.lookups = 0
        self.down = False

    def find(self, key_id: str) -> Row | None:
        self.lookups += 1
        if self.down:
            raise ConnectionError("database down")
        return self.rows.get(key_id)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def setup(ttl_s: float = 30.0) -> tuple[Table, Clock, KeyVerifier, str]:
    table, clock = Table(), Clock()
    issued = issue_key()
    table.rows[issued.key_id] = Row(issued.key_id, "acct_1", "acme", issued.key_hash)
    return table, clock, KeyVerifier(table.find, ttl_s, clock), issued.key


def verify(verifier: KeyVerifier, key: str | None):
    return asyncio.run(verifier.verify(key))


def rejected(verifier: KeyVerifier, key: str | None) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        verify(verifier, key)
    return caught.value


def test_keys_are_random_well_formed_and_stored_as_a_hash() -> None:
    first, second = issue_key(), issue_key()
    assert first.key != second.key and first.key_id != second.key_id
    assert first.key.startswith("ccp_") and key_id_of(first.key) == first.key_id
    assert len(first.key) == len("ccp_") + 12 + 1 + 43  # 48-bit id, 32 random bytes url-safe
    assert first.key_hash == hash_key(first.key) and first.key not in first.key_hash
    assert key_id_of("sk-not-ours") is None


def test_a_valid_key_admits_its_account() -> None:
    _, _, verifier, key = setup()
    principal = verify(verifier, key)
    assert (principal.account_id, principal.account_name, principal.key_id) == ("acct_1", "acme", key_id_of(key))


@pytest.mark.parametrize("code,mangle", [
    ("missing_api_key", lambda key: None),
    ("missing_api_key", lambda key: ""),
    ("invalid_api_key", lambda key: key[:-1] + ("A" if key[-1] != "A" else "B")),  # right id, wrong secret
    ("invalid_api_key", lambda key: "ccp_000000000000_" + key[17:]),  # unknown id
    ("invalid_api_key", lambda key: "sk-proj-something"),
])
def test_missing_wrong_and_unknown_keys_are_401(code, mangle) -> None:
    _, _, verifier, key = setup()
    error = rejected(verifier, mangle(key))
    assert (error.status, error.code, error.type) == (401, code, "invalid_request_error")
    assert key not in error.message  # never echo a whole key


def test_revocation_bites_once_the_cached_row_expires() -> None:
    table, clock, verifier, key = setup(ttl_s=30)
    verify(verifier, key)
    table.rows[key_id_of(key)] = replace(table.rows[key_id_of(key)], revoked_at="2026-11-26")
    verify(verifier, key)  # still cached
    clock.now = 31
    assert rejected(verifier, key).code == "revoked_api_key"


def test_a_cached_key_survives_a_database_outage_an_unknown_one_gets_503() -> None:
    table, clock, verifier, key = setup(ttl_s=30)
    verify(verifier, key)
    lookups = table.lookups
    verify(verifier, key)
    assert table.lookups == lookups  # served from the cache
    table.down, clock.now = True, 100
    assert verify(verifier, key).account_name == "acme"  # stale row, database down
    error = rejected(verifier, issue_key().key)
    assert (error.status, error.code) == (503, "key_store_unavailable")


def test_which_header_carries_the_ccproxy_key() -> None:
    ours = issue_key().key
    assert presented_key({"x-api-key": ours, "authorization": "Bearer sk-upstream"}, False) == ours
    assert presented_key({"authorization": f"Bearer {ours}"}, False) == ours
    # A provider key in Authorization is the caller's business unless the server holds its own.
    assert presented_key({"authorization": "Bearer sk-upstream"}, False) is None
    assert presented_key({"authorization": "Bearer sk-upstream"}, True) == "sk-upstream"
    assert presented_key({"authorization": "Basic abc"}, True) is None


def test_a_ccproxy_bearer_key_never_reaches_the_upstream() -> None:
    ours = issue_key().key
    assert upstream_request_headers({"authorization": f"Bearer {ours}"}, None) == {}
    assert upstream_request_headers({"authorization": "Bearer sk-x", "x-api-key": ours}, None) == {
        "authorization": "Bearer sk-x"
    }


def test_key_hashes_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong secret under a real key id reaches hmac.compare_digest, never ``==``: the time a
    refusal takes must not tell how much of the hash matched."""
    import hmac

    issued = issue_key()
    row = Row(issued.key_id, "acct", "acme", issued.key_hash)
    verifier = KeyVerifier(lambda key_id: row if key_id == row.key_id else None, ttl_s=0)
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a, b):  # type: ignore[no-untyped-def]
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert asyncio.run(verifier.verify(issued.key)).account_id == "acct"
    wrong = issued.key[:-4] + ("AAAA" if not issued.key.endswith("AAAA") else "BBBB")
    with pytest.raises(ProxyError) as caught:
        asyncio.run(verifier.verify(wrong))
    assert caught.value.status == 401
    assert [b for _, b in compared] == [issued.key_hash, issued.key_hash]
