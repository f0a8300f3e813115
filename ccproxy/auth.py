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
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

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


def _shown(key: str) -> str:
    return key[:8] + "*" * 4 if len(key) > 12 else "*" * 4


class KeyVerifier:
    """Verifies presented keys against the store, trusting a verified row for ``ttl_s``.

    The cache keeps known keys working while the database is down (a stale row is better
    than refusing paying callers), at the price of a revocation taking up to ``ttl_s``.
    """

    def __init__(
        self,
        find_key: Callable[[str], StoredKey | None],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._find_key = find_key
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[StoredKey, float]] = {}

    async def _row(self, key_id: str) -> StoredKey | None:
        cached = self._cache.get(key_id)
        if cached is not None and self._clock() - cached[1] < self._ttl_s:
            return cached[0]
        try:
            row = await asyncio.to_thread(self._find_key, key_id)
        except Exception as exc:
            if cached is not None:
                logger.warning("key store unavailable (%s); using the cached key row", type(exc).__name__)
                return cached[0]
            logger.warning("key store unavailable (%s)", type(exc).__name__)
            raise ProxyError(
                503,
                "API keys cannot be checked right now; try again shortly.",
                type="server_error",
                code="key_store_unavailable",
            ) from None
        if row is None:
            self._cache.pop(key_id, None)
        else:
            self._cache[key_id] = (row, self._clock())
        return row

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
            raise _unauthorized(f"Incorrect API key provided: {_shown(key)}.", "invalid_api_key")
        if row.revoked_at is not None:
            raise _unauthorized(f"API key {row.key_id} has been revoked.", "revoked_api_key")
        return Principal(account_id=row.account_id, account_name=row.account_name, key_id=row.key_id)


class Authenticator(Protocol):
    async def admit(self, headers: Mapping[str, str]) -> Principal: ...


class KeyAuthenticator:
    def __init__(self, verifier: KeyVerifier, server_holds_upstream_key: bool) -> None:
        self._verifier = verifier
        self._server_holds_upstream_key = server_holds_upstream_key

    async def admit(self, headers: Mapping[str, str]) -> Principal:
        return await self._verifier.verify(presented_key(headers, self._server_holds_upstream_key))


class OpenAccess:
    """No keys: everything is booked to one account. Only when CCPROXY_AUTH_MODE=open."""

    def __init__(self, principal: Principal) -> None:
        self._principal = principal

    async def admit(self, headers: Mapping[str, str]) -> Principal:
        return self._principal
