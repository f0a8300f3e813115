"""The originals that lossless, citation and sidecar modes drop, kept in Redis so that any
replica can hand them back (ccproxy/retrieval.py has the rules; this store keeps them).

Each account's entries live under one Redis hash tag, so a cluster keeps them on one shard and
one Lua script can bound them atomically: an entry expires after CCPROXY_RETRIEVAL_TTL_S, and an
account holds at most CCPROXY_RETRIEVAL_MAX_ENTRIES entries and CCPROXY_RETRIEVAL_MAX_BYTES bytes,
the oldest going first. The bound on all accounts together is Redis's own `maxmemory` (with an
eviction policy such as `volatile-lru`: every key here has a TTL). Ids are the same as in process
(`stable_ref` for markers, random for the sidecar), so a marker written by one replica is
answered by another.

Blocking calls on a synchronous client: callers run them in threads (the compressor's heavy
work, `asyncio.to_thread`). Redis unreachable: the worker's own in-memory store takes the text
(answered only by this worker) and answers lookups, and Redis is left alone for a few seconds.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any

from ccproxy.retrieval import ID_BYTES, RetrievalStore, stable_ref
from ccproxy.settings import Settings
from ccproxy.shared.clients import sync_client
from ccproxy.shared.outage import Outage

# KEYS: the account's index (ref -> expiry, ms), sizes (ref -> bytes), bytes held, the text's key.
# ARGV: ref, text, ttl ms, max entries, max bytes, the prefix of the account's text keys.
KEEP_SCRIPT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local index, sizes, held_key = KEYS[1], KEYS[2], KEYS[3]
local ref, text, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_entries, max_bytes, prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local held = tonumber(redis.call('GET', held_key) or '0')
local function forget(r)
  held = held - tonumber(redis.call('HGET', sizes, r) or '0')
  redis.call('HDEL', sizes, r)
  redis.call('ZREM', index, r)
  redis.call('DEL', prefix .. r)
end
for _, r in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now)) do forget(r) end
if redis.call('ZSCORE', index, ref) then forget(ref) end
local size = string.len(text)
while redis.call('ZCARD', index) > 0 and (redis.call('ZCARD', index) >= max_entries or held + size > max_bytes) do
  forget(redis.call('ZRANGE', index, 0, 0)[1])
end
redis.call('SET', prefix .. ref, text, 'PX', ttl)
redis.call('ZADD', index, now + ttl, ref)
redis.call('HSET', sizes, ref, size)
held = held + size
redis.call('SET', held_key, held, 'PX', ttl)
redis.call('PEXPIRE', index, ttl)
redis.call('PEXPIRE', sizes, ttl)
return 1
"""


def _tag(account: str) -> str:
    """The account's hash tag: fixed length, whatever characters its id holds."""
    return hashlib.sha256(account.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class RedisRetrievalStore:
    remote = True  # blocking network calls: keep them off the event loop

    def __init__(
        self, client: Any, ttl_s: float, max_entries: int, max_bytes: int, local: RetrievalStore,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client  # redis.Redis (synchronous, thread-safe)
        self._keep_script = client.register_script(KEEP_SCRIPT)
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._local = local
        self._outage = Outage("retrieval store", clock)

    @property
    def failures(self) -> int:
        return self._outage.failures

    def _keys(self, account: str) -> tuple[str, str, str, str]:
        base = f"ccproxy:rt:{{{_tag(account)}}}:"
        return base + "index", base + "sizes", base + "bytes", base + "t:"

    def put(self, account: str, text: str) -> str | None:
        return self._keep(account, text, secrets.token_hex(ID_BYTES))

    def keep(self, account: str, text: str) -> str | None:
        return self._keep(account, text, stable_ref(account, text))

    def _keep(self, account: str, text: str, ref: str) -> str | None:
        encoded = text.encode("utf-8", "surrogatepass")
        if len(encoded) > self.max_bytes or self.max_entries < 1:
            return None  # as in process: nothing stored, nothing evicted for it
        if self._outage.usable():
            index, sizes, held, prefix = self._keys(account)
            try:
                self._keep_script(
                    keys=[index, sizes, held, prefix + ref],
                    args=[ref, encoded, max(1, round(self.ttl_s * 1000)), self.max_entries, self.max_bytes, prefix],
                )
                return ref
            except Exception as exc:  # redis.RedisError, OSError: this worker keeps it
                self._outage.failed(exc)
        return self._local._keep(account, text, ref)

    def get(self, account: str, ref: str) -> str | None:
        found = self._local.get(account, ref)  # kept here while Redis was down
        if found is not None or not self._outage.usable():
            return found
        try:
            raw = self._client.get(self._keys(account)[3] + ref)
        except Exception as exc:
            self._outage.failed(exc)
            return None
        return None if raw is None else raw.decode("utf-8", "surrogatepass")


def build_store(settings: Settings) -> RetrievalStore | RedisRetrievalStore:
    """The worker's store without CCPROXY_REDIS_URL; the shared one with it."""
    local = RetrievalStore.from_settings(settings)
    if settings.redis_url is None:
        return local
    return RedisRetrievalStore(
        sync_client(settings, text=False), settings.retrieval_ttl_s, settings.retrieval_max_entries,
        settings.retrieval_max_bytes, local,
    )
