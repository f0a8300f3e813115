"""Shared state on a real redis-server (ccproxy/shared/): per-key limits that hold across
limiters (workers, replicas), the history memo, the dropped originals of lossless mode, and what
each does when Redis is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ccproxy.compression.history import SegmentDecision
from ccproxy.compression.pipeline import Decision
from ccproxy.protocol import ProxyError
from ccproxy.retrieval import RetrievalStore, stable_ref
from ccproxy.settings import Settings
from ccproxy.shared.clients import async_client
from ccproxy.shared.limits import KEY_PREFIX, RedisRateLimiter
from ccproxy.shared.memo import RedisHistoryMemo, decode_decision, encode_decision, redis_key
from ccproxy.shared.retrieval import RedisRetrievalStore
from tests.redis_server import free_port, redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(autouse=True)
def _empty(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()


def _limiter(url: str, rpm: int = 0, tpm: int = 0, **kwargs) -> RedisRateLimiter:
    return RedisRateLimiter(async_client(Settings(redis_url=url, redis_timeout_s=0.25)), rpm, tpm, **kwargs)


async def _outcome(call) -> int:
    try:
        await call
    except ProxyError as exc:
        return exc.status
    return 200


def test_a_keys_request_limit_holds_across_limiters(redis_url: str) -> None:
    async def go() -> list[int]:
        workers = [_limiter(redis_url, rpm=3), _limiter(redis_url, rpm=3)]  # two workers or replicas
        return [await _outcome(workers[i % 2].aadmit_request("key_a")) for i in range(4)] + [
            await _outcome(workers[0].aadmit_request("key_b"))  # another key: its own bucket
        ]

    assert asyncio.run(go()) == [200, 200, 200, 429, 200]


def test_a_refusal_says_when_to_retry(redis_url: str) -> None:
    async def go() -> ProxyError:
        limiter = _limiter(redis_url, rpm=60)  # one a second
        for _ in range(60):
            await limiter.aadmit_request("k")
        with pytest.raises(ProxyError) as caught:
            await limiter.aadmit_request("k")
        return caught.value

    refusal = asyncio.run(go())
    assert refusal.status == 429 and refusal.code == "rate_limit_exceeded" and refusal.headers["retry-after"] == "1"


def test_completion_tokens_leave_debt_and_refunds_give_back(redis_url: str) -> None:
    async def go() -> list[int]:
        limiter = _limiter(redis_url, tpm=600)
        statuses = [await _outcome(limiter.aadmit_tokens("k", 400))]  # 200 left
        limiter.charge_tokens("k", 300)  # a long completion: 100 in debt
        await limiter.drain()
        statuses.append(await _outcome(limiter.aadmit_tokens("k", 10)))
        limiter.refund_tokens("k", 500)  # compression dropped 500 of them: back to 400
        await limiter.drain()
        statuses.append(await _outcome(limiter.aadmit_tokens("k", 300)))
        return statuses

    assert asyncio.run(go()) == [200, 429, 200]
    # The bucket's key expires once the bucket would be full again: idle keys cost nothing.
    ttl_ms = redis.Redis.from_url(redis_url).pttl(f"{KEY_PREFIX}tokens:k")
    assert 0 < ttl_ms <= 61_000


def test_redis_down_fails_open_or_closed_as_set_and_quickly() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    refused: list[str] = []

    async def go(fail_open: bool) -> int:
        limiter = _limiter(dead, rpm=1, fail_open=fail_open, on_unavailable=lambda: refused.append("x"))
        return await _outcome(limiter.aadmit_request("k"))

    started = time.monotonic()
    assert asyncio.run(go(True)) == 200 and refused == []
    assert asyncio.run(go(False)) == 503 and refused == ["x"]
    assert time.monotonic() - started < 2


def _decision(n: int) -> SegmentDecision:
    return SegmentDecision(
        Decision("compressed", (True, False, True), (0.5, None, -1.25), ((2, (True, False), 7),)), (10, 20, n)
    )


def test_decisions_survive_the_round_trip_exactly() -> None:
    found = _decision(30)
    assert decode_decision(encode_decision(found)) == found


def test_the_memo_is_shared_and_written_with_a_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    first, second = RedisHistoryMemo(client, 600), RedisHistoryMemo(client, 600)
    key = (("acct", "chat"), b"\x01digest", "plan", "tiktoken:o200k_base")
    assert second.get(key) is None
    first.put(key, _decision(30))
    assert second.get(key) == _decision(30)  # another worker or replica finds it
    assert 0 < client.ttl(redis_key(key)) <= 600
    assert second.hits == 1 and second.misses == 1
    assert "digest" not in client.get(redis_key(key))  # decisions only: flags and counts


def test_without_redis_the_memo_falls_back_to_the_workers_own(tmp_path: Path) -> None:
    dead = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    clock = [0.0]
    memo = RedisHistoryMemo(dead, 600, clock=lambda: clock[0])
    memo.put("k", _decision(1))  # Redis refuses: kept locally, nothing raised
    assert memo.get("k") == _decision(1) and memo.failures == 1
    assert memo.get("other") is None and memo.failures == 1  # Redis is left alone for a while
    clock[0] += 10
    assert memo.get("other") is None and memo.failures == 2  # then tried again


def _store(client: redis.Redis, *, ttl_s: float = 60, max_entries: int = 100, max_bytes: int = 10_000) -> RedisRetrievalStore:
    return RedisRetrievalStore(client, ttl_s, max_entries, max_bytes, RetrievalStore(ttl_s, max_entries, max_bytes))


def test_originals_kept_by_one_replica_are_answered_by_another(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    first, second = _store(client), _store(client)
    ref = first.keep("acct_a", "the dropped paragraph, é 世界")
    assert ref == stable_ref("acct_a", "the dropped paragraph, é 世界")  # the marker is the same everywhere
    assert second.get("acct_a", ref) == "the dropped paragraph, é 世界"
    assert second.get("acct_b", ref) is None  # another account's id answers nothing
    random_ref = second.put("acct_a", "sidecar row")
    assert random_ref is not None and first.get("acct_a", random_ref) == "sidecar row"


def test_each_account_is_bounded_oldest_first_and_entries_expire(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    store = _store(client, max_entries=2, max_bytes=100)
    refs = [store.keep("acct", f"text {i}") for i in range(3)]
    assert [store.get("acct", r) for r in refs] == [None, "text 1", "text 2"]  # two entries at most
    big = store.keep("acct", "x" * 95)  # over 100 bytes with what is held: the rest goes
    assert store.get("acct", refs[2]) is None and store.get("acct", big) == "x" * 95
    assert store.keep("acct", "y" * 101) is None  # alone over the bound: not kept, nothing evicted
    assert store.get("acct", big) == "x" * 95
    short = _store(client, ttl_s=0.3)
    ref = short.keep("other", "brief")
    assert short.get("other", ref) == "brief"
    time.sleep(0.4)
    assert short.get("other", ref) is None


def test_without_redis_the_worker_keeps_the_originals_itself() -> None:
    dead = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    store = _store(dead)
    ref = store.keep("acct", "kept locally")
    assert store.get("acct", ref) == "kept locally" and store.failures == 1
