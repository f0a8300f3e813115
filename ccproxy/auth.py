"""ccproxy API keys: issuing them, finding the one a request presents, and verifying it.

A key reads ``ccp_<key id>_<secret>``: the key id (48 random bits) is public and names the
row; the secret carries 256 random bits. Only the SHA-256 of the whole key is stored — a
slow password hash buys nothing against 256-bit secrets — and it is compared in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ccproxy.limits import Bucket, refilled, retry_after_header
from ccproxy.protocol import ProxyError

logger = logging.getLogger("ccproxy.auth")

KEY_PREFIX = "ccp_"
_KEY_SHAPE = re.compile(r"^ccp_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
OPEN_ACCOUNT = "open"


@dataclass(frozen=True)
class IssuedKey:
    key: str  # shown once, never stored
    key_id: str
    key_hash: str


@dataclass(frozen=True)
class Principal:
    """Who a request is booked to."""

    account_id: str
    account_name: str
    key_id: str | None


class StoredKey(Protocol):
    key_id: str
    account_id: str
    account_name: str
    key_hash: str
    revoked_at: object | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def issue_key() -> IssuedKey:
    key = f"{KEY_PREFIX}{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    return IssuedKey(key=key, key_id=key_id_of(key) or "", key_hash=hash_key(key))


def key_id_of(key: str) -> str | None:
    match = _KEY_SHAPE.match(key)
    return match.group(1) if match else None


def _bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def presented_key(headers: Mapping[str, str], server_holds_upstream_key: bool) -> str | None:
    """The ccproxy key a request carries.

    ``X-API-Key`` always names it. A Bearer token does too when it is shaped like a ccproxy
    key, or when the server holds the upstream key (then the caller's Bearer cannot be meant
    for the upstream), so that a plain OpenAI SDK with ``api_key=`` works.
    """
    explicit = headers.get("x-api-key", "").strip()
    if explicit:
        return explicit
    bearer = _bearer(headers)
    if bearer and (bearer.startswith(KEY_PREFIX) or server_holds_upstream_key):
        return bearer
    return None


def _unauthorized(message: str, code: str) -> ProxyError:
    return ProxyError(401, message, type="invalid_request_error", code=code)


# Most unknown key ids remembered, and most client addresses tracked: bounds the memory an
# attacker can make a worker spend by cycling ids or addresses (the oldest are forgotten first).
MAX_REMEMBERED = 100_000


def _store_unavailable() -> ProxyError:
    return ProxyError(
        503,
        "API keys cannot be checked right now; try again shortly.",
        type="server_error",
        code="key_store_unavailable",
    )


class KeyVerifier:
    """Verifies presented keys against the store, trusting a verified row for ``ttl_s``.

    The cache keeps known keys working through a short database outage (a stale row is
    better than refusing paying callers), but only for ``max_stale_s`` after the row was last
    read: a key revoked just before the outage must not work for as long as the outage lasts.
    Unknown key ids are remembered for ``negative_ttl_s``, so a bogus key sent again and again
    costs one database lookup, not one per request.
    """

    def __init__(
        self,
        find_key: Callable[[str], StoredKey | None],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_stale_s: float = math.inf,
        negative_ttl_s: float = 0.0,
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        self._find_key = find_key
        self._ttl_s = ttl_s
        self._max_stale_s = max_stale_s
        self._negative_ttl_s = negative_ttl_s
        self._max_remembered = max_remembered
        self._clock = clock
        self._cache: dict[str, tuple[StoredKey, float]] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()  # key id -> when it was found absent

    def _known_absent(self, key_id: str, now: float) -> bool:
        seen = self._unknown.get(key_id)
        if seen is None:
            return False
        if now - seen < self._negative_ttl_s:
            return True
        del self._unknown[key_id]
        return False

    def _remember_absent(self, key_id: str, now: float) -> None:
        if self._negative_ttl_s <= 0:
            return
        self._unknown[key_id] = now
        self._unknown.move_to_end(key_id)
        while len(self._unknown) > self._max_remembered:
            self._unknown.popitem(last=False)

    async def _row(self, key_id: str) -> StoredKey | None:
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[1] < self._ttl_s:
            return cached[0]
        if cached is None and self._known_absent(key_id, now):
            return None
        try:
            row = await asyncio.to_thread(self._find_key, key_id)
        except Exception as exc:
            if cached is not None and self._clock() - cached[1] <= self._max_stale_s:
                logger.warning("key store unavailable (%s); using the cached key row", type(exc).__name__)
                return cached[0]
            logger.warning("key store unavailable (%s)", type(exc).__name__)
            raise _store_unavailable() from None
        if row is None:
            self._cache.pop(key_id, None)
            self._remember_absent(key_id, self._clock())
        else:
            self._cache[key_id] = (row, self._clock())
            self._unknown.pop(key_id, None)
        return row

    def admits_from_cache(self, key: str | None) -> bool:
        """Whether ``key`` is a live key that a fresh cached row vouches for (no database
        needed): such a key passes even where its client address is over its failure budget."""
        key_id = key_id_of(key) if key else None
        cached = self._cache.get(key_id) if key_id else None
        if cached is None or self._clock() - cached[1] >= self._ttl_s:
            return False
        row = cached[0]
        return row.revoked_at is None and hmac.compare_digest(hash_key(key or ""), row.key_hash)

    async def verify(self, key: str | None) -> Principal:
        if not key:
            raise _unauthorized(
                "You didn't provide a ccproxy API key. Send it as 'X-API-Key: <key>' "
                "(or as the Bearer token when the server holds the upstream key).",
                "missing_api_key",
            )
        key_id = key_id_of(key)
        row = await self._row(key_id) if key_id else None
        if row is None or not hmac.compare_digest(hash_key(key), row.key_hash):
            # Never quote the key, not even its first characters: error bodies hold no request content.
            raise _unauthorized("Incorrect API key provided.", "invalid_api_key")
        if row.revoked_at is not None:
            raise _unauthorized("This API key has been revoked.", "revoked_api_key")
        return Principal(account_id=row.account_id, account_name=row.account_name, key_id=row.key_id)


class FailedAuthLimiter:
    """Per client address, a budget of requests with a wrong, unknown or revoked key.

    Each failure takes one unit from a bucket of ``per_minute`` that refills over a minute; an
    address with an empty bucket is refused with 429 *before* its key is looked up, so guessing
    keys costs the database nothing and the guesser a minute per ``per_minute`` tries. In the
    worker's memory only (like the per-key limits), at most ``max_remembered`` addresses.
    """

    CODE = "too_many_failed_auth"

    def __init__(
        self, per_minute: int, clock: Callable[[], float] = time.monotonic, max_remembered: int = MAX_REMEMBERED
    ) -> None:
        self.per_minute = per_minute
        self._per_second = per_minute / 60.0
        self._clock = clock
        self._max_remembered = max_remembered
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def check(self, client: str | None) -> None:
        """Raise 429 when ``client`` has no failure left."""
        if not self.per_minute or client is None or client not in self._buckets:
            return
        now = self._clock()
        bucket = refilled(self._buckets[client], self.per_minute, self._per_second, now)
        if bucket.level >= 1:
            return
        wait_s = (1 - bucket.level) / self._per_second
        raise ProxyError(
            429,
            "Too many requests with an invalid API key from this address. "
            f"Please try again in {wait_s:.1f}s.",
            type="requests",
            code=self.CODE,
            headers={"retry-after": retry_after_header(wait_s)},
        )

    def failed(self, client: str | None) -> None:
        if not self.per_minute or client is None:
            return
        now = self._clock()
        start = self._buckets.get(client) or Bucket(float(self.per_minute), now)
        current = refilled(start, self.per_minute, self._per_second, now)
        self._buckets[client] = Bucket(current.level - 1, current.at)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self._max_remembered:
            self._buckets.popitem(last=False)


# Refusals that count against the client address: a key was presented and it was wrong.
_FAILED_AUTH_CODES = frozenset({"invalid_api_key", "revoked_api_key"})


class Authenticator(Protocol):
    async def admit(self, headers: Mapping[str, str], client: str | None = None) -> Principal: ...


class KeyAuthenticator:
    def __init__(
        self,
        verifier: KeyVerifier,
        server_holds_upstream_key: bool,
        failures: FailedAuthLimiter | None = None,
    ) -> None:
        self._verifier = verifier
        self._server_holds_upstream_key = server_holds_upstream_key
        self._failures = failures or FailedAuthLimiter(0)

    async def admit(self, headers: Mapping[str, str], client: str | None = None) -> Principal:
        """``client`` is the caller's address (the TCP peer), for the failed-auth budget."""
        key = presented_key(headers, self._server_holds_upstream_key)
        if not self._verifier.admits_from_cache(key):
            self._failures.check(client)
        try:
            return await self._verifier.verify(key)
        except ProxyError as exc:
            if exc.code in _FAILED_AUTH_CODES:
                self._failures.failed(client)
            raise


class OpenAccess:
    """No keys: everything is booked to one account. Only when CCPROXY_AUTH_MODE=open."""

    def __init__(self, principal: Principal) -> None:
        self._principal = principal

    async def admit(self, headers: Mapping[str, str], client: str | None = None) -> Principal:
        return self._principal
