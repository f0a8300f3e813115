"""The stable-history memo in Redis, so that every worker and replica resends a chat's history
exactly as the first one forwarded it (ccproxy/compression/history.py says why that matters).

Scores are deterministic, so another replica would usually decide an old turn the same way; the
shared memo makes it certain (a Compressor upgrade mid-chat, a GPU's non-deterministic kernels, a
budget that a later request decided differently) and spares the rescoring. A decision is a few
flags and counts per unit (never text), stored as JSON under a hash of its memo key, for
CCPROXY_REDIS_MEMO_TTL_S after its last write.

Blocking calls on a synchronous client: the compressor runs them in its heavy-work threads,
never on the event loop. Redis unreachable: the worker's own memo answers, and Redis is left
alone for a few seconds rather than waited on for every segment.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Hashable
from typing import Any

from ccproxy.compression.history import HistoryMemo, SegmentDecision
from ccproxy.compression.pipeline import Decision
from ccproxy.settings import Settings
from ccproxy.shared.clients import sync_client
from ccproxy.shared.outage import Outage

KEY_PREFIX = "ccproxy:memo:"


def redis_key(key: Hashable) -> str:
    """A fixed-length Redis key for a memo key (scope, chain digest, plan, tokenizer): its repr is
    the same in every process for the same inputs."""
    return KEY_PREFIX + hashlib.sha256(repr(key).encode("utf-8", "surrogatepass")).hexdigest()


def encode_decision(found: SegmentDecision) -> str:
    d = found.decision
    return json.dumps({
        "outcome": d.outcome,
        "keep": list(d.keep),
        "scores": list(d.scores),
        "partial": [[unit, list(flags), tokens] for unit, flags, tokens in d.partial],
        "tokens": list(found.tokens),
    }, separators=(",", ":"))


def decode_decision(text: str) -> SegmentDecision:
    raw = json.loads(text)
    decision = Decision(
        outcome=raw["outcome"],
        keep=tuple(bool(k) for k in raw["keep"]),
        scores=tuple(None if s is None else float(s) for s in raw["scores"]),
        partial=tuple((int(unit), tuple(bool(f) for f in flags), int(tokens)) for unit, flags, tokens in raw["partial"]),
    )
    return SegmentDecision(decision, tuple(int(n) for n in raw["tokens"]))


class RedisHistoryMemo(HistoryMemo):
    """A HistoryMemo whose entries live in Redis; the local LRU answers when Redis cannot."""

    remote = True  # the compressor keeps its calls off the event loop

    def __init__(self, client: Any, ttl_s: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._client = client  # redis.Redis (synchronous, thread-safe)
        self._ttl_s = ttl_s
        self._outage = Outage("history memo", clock)

    @property
    def failures(self) -> int:
        return self._outage.failures

    def get(self, key: Hashable) -> SegmentDecision | None:
        # A decision never changes once made, so this worker's copy is as good as Redis's.
        found = super().get(key)
        if found is not None or not self._outage.usable():
            return found
        try:
            text = self._client.get(redis_key(key))
        except Exception as exc:  # redis.RedisError, OSError: the local memo answered already
            self._outage.failed(exc)
            return None
        if text is None:
            return None
        found = decode_decision(text)
        super().put(key, found)  # later lookups on this worker skip the round trip
        with self._lock:
            self.hits += 1
            self.misses -= 1  # counted by the local lookup above
        return found

    def put(self, key: Hashable, value: SegmentDecision) -> None:
        super().put(key, value)
        if self._outage.usable():
            try:
                self._client.set(redis_key(key), encode_decision(value), ex=self._ttl_s)
            except Exception as exc:
                self._outage.failed(exc)


def build_memo(settings: Settings) -> HistoryMemo:
    """The worker's memo without CCPROXY_REDIS_URL; the shared one with it."""
    if settings.redis_url is None:
        return HistoryMemo()
    return RedisHistoryMemo(sync_client(settings, text=True), settings.redis_memo_ttl_s)
