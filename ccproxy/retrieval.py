"""Originals of what compression dropped, kept briefly so that a model can ask for them back.

Lossless mode (``ccproxy/lossless/``) replaces each dropped stretch with a marker naming an id,
which the ``ccproxy_retrieve`` tool answers from here; citation mode and ``POST /v1/compress``
in sidecar mode (docs/SIDECAR.md) name ids that ``GET /v1/retrieve/{id}`` answers, to the
account that compressed the text only. The product keeps no context long-term, so the store
is in memory, per Gateway worker, and bounded four ways: each entry lives ``ttl_s`` seconds,
each account holds at most ``max_entries`` entries and ``max_bytes`` bytes of text, and all
accounts together at most ``max_total_bytes`` (the oldest go first, whoever put them). Ids are 96 bits in lowercase hex, of the shape LiteLLM's headroom guardrail accepts
(``[a-f0-9]{12,24}``): random for the sidecar; for lossless and citation markers a keyed hash
of the account and the text (``stable_ref``), so the same dropped text gets the same marker on
every request and the forwarded history stays byte-identical (provider prompt caches keep
hitting), on every worker and across restarts. Keeping it again restarts its TTL. An id is
only ever looked up within its account. Nothing here logs text or ids.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ccproxy.settings import Settings, get_settings

ID_BYTES = 12  # 24 hex characters
_REF_KEY = b"ccproxy-retrieve-v1"  # separates these hashes from any other use of BLAKE2b


def stable_ref(account: str, text: str) -> str:
    """The id ``text`` is kept under for ``account`` by ``keep``."""
    digest = hashlib.blake2b(digest_size=ID_BYTES, key=_REF_KEY)
    digest.update(account.encode("utf-8", "surrogatepass"))
    digest.update(b"\0")
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


class OriginalsStore(Protocol):
    """What callers use: RetrievalStore in process, ccproxy.shared.retrieval's in Redis (whose
    calls block on the network: run them in threads)."""

    def put(self, account: str, text: str) -> str | None: ...
    def keep(self, account: str, text: str) -> str | None: ...
    def get(self, account: str, ref: str) -> str | None: ...


SWEEP_EVERY = 256  # every this many puts, expired entries of every account go


@dataclass(frozen=True)
class _Entry:
    expires_at: float
    text: str
    size: int  # bytes of text, UTF-8


class _Shelf:
    """One account's entries, oldest first (one TTL for all, so also soonest to expire first)."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.size = 0

    def drop(self, ref: str) -> int:
        """Removes ``ref``; the bytes it held."""
        entry = self.entries.pop(ref)
        self.size -= entry.size
        return entry.size


class RetrievalStore:
    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        max_total_bytes: int | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # Default: 16 accounts' worth; a worker's memory must not grow with the number of accounts.
        self.max_total_bytes = 16 * max_bytes if max_total_bytes is None else max_total_bytes
        self._clock = clock
        self._shelves: dict[str, _Shelf] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()  # every entry, oldest first
        self._total = 0
        self._puts = 0
        self._lock = threading.Lock()  # callers may be threads (heavy work) as well as the loop

    @classmethod
    def from_settings(cls, settings: Settings) -> RetrievalStore:
        return cls(
            settings.retrieval_ttl_s, settings.retrieval_max_entries, settings.retrieval_max_bytes,
            max_total_bytes=settings.retrieval_max_total_bytes,
        )

    def put(self, account: str, text: str) -> str | None:
        """Keeps ``text`` for ``account`` under a new random id; the id, or None when the text
        alone is over the account's byte bound (nothing is stored, and nothing else is evicted
        for it)."""
        return self._keep(account, text, secrets.token_hex(ID_BYTES))

    def keep(self, account: str, text: str) -> str | None:
        """Keeps ``text`` for ``account`` under ``stable_ref`` (again: its TTL restarts); the
        id, or None as ``put``."""
        return self._keep(account, text, stable_ref(account, text))

    def _keep(self, account: str, text: str, ref: str) -> str | None:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > min(self.max_bytes, self.max_total_bytes) or self.max_entries < 1:
            return None
        now = self._clock()
        with self._lock:
            self._puts += 1
            if self._puts % SWEEP_EVERY == 0:  # accounts that stopped calling hold nothing for long
                self._sweep(now)
            shelf = self._shelves.setdefault(account, _Shelf())
            self._expire(account, shelf, now)
            if ref in shelf.entries:
                self._drop(account, ref)  # kept again: it goes to the back, with a new TTL
            while shelf.entries and (len(shelf.entries) >= self.max_entries or shelf.size + size > self.max_bytes):
                self._drop(account, next(iter(shelf.entries)))
            while self._order and self._total + size > self.max_total_bytes:
                self._drop(*next(iter(self._order)))
            shelf.entries[ref] = _Entry(now + self.ttl_s, text, size)
            shelf.size += size
            self._order[(account, ref)] = None
            self._total += size
        return ref

    def get(self, account: str, ref: str) -> str | None:
        """The text kept under ``ref`` for ``account``; None when unknown, expired, evicted,
        or kept for another account (the caller cannot tell which)."""
        now = self._clock()
        with self._lock:
            shelf = self._shelves.get(account)
            if shelf is None:
                return None
            self._expire(account, shelf, now)
            if not shelf.entries:
                del self._shelves[account]
                return None
            entry = shelf.entries.get(ref)
            return None if entry is None else entry.text

    def sweep(self) -> None:
        """Drops every expired entry (and the accounts left with none)."""
        with self._lock:
            self._sweep(self._clock())

    def stats(self) -> tuple[int, int]:
        """(entries, bytes) held, all accounts together."""
        with self._lock:
            return (
                sum(len(shelf.entries) for shelf in self._shelves.values()),
                sum(shelf.size for shelf in self._shelves.values()),
            )

    def _sweep(self, now: float) -> None:
        for account in list(self._shelves):
            shelf = self._shelves[account]
            self._expire(account, shelf, now)
            if not shelf.entries:
                del self._shelves[account]

    def _drop(self, account: str, ref: str) -> None:
        self._total -= self._shelves[account].drop(ref)
        del self._order[(account, ref)]

    def _expire(self, account: str, shelf: _Shelf, now: float) -> None:
        while shelf.entries:
            ref, entry = next(iter(shelf.entries.items()))
            if entry.expires_at > now:
                return
            self._drop(account, ref)


_store: OriginalsStore | None = None
_store_lock = threading.Lock()


def shared_store() -> OriginalsStore:
    """This worker's store, built from the settings on first use: in Redis with
    CCPROXY_REDIS_URL, so that every replica answers every id, else in this worker's memory."""
    global _store
    if _store is None:
        with _store_lock:
            if _store is None:
                from ccproxy.shared.retrieval import build_store

                _store = build_store(get_settings())
    return _store
