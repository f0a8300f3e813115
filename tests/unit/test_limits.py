"""The rate-limit and concurrency maths, driven by a fake clock."""

from __future__ import annotations

import pytest

from ccproxy.serving import tokens_to_settle
from ccproxy.limits import Bucket, ConcurrencyGate, RateLimiter, debit, refilled, retry_after_header, try_take
from ccproxy.protocol import ProxyError
from ccproxy.usage_tap import UpstreamUsage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    assert refilled(Bucket(0, 0), capacity=60, per_second=1, now=30) == Bucket(30, 30)
    assert refilled(Bucket(50, 0), capacity=60, per_second=1, now=30) == Bucket(60, 30)


def test_a_clock_that_steps_back_neither_drains_nor_fills() -> None:
    assert refilled(Bucket(10, 100), capacity=60, per_second=1, now=90) == Bucket(10, 100)


def test_take_admits_while_units_last_then_says_how_long_to_wait() -> None:
    bucket = Bucket(2, 0)
    bucket, wait = try_take(bucket, 1, capacity=2, per_second=0.5, now=0)
    assert (bucket.level, wait) == (1, 0.0)
    bucket, wait = try_take(bucket, 1, capacity=2, per_second=0.5, now=0)
    assert (bucket.level, wait) == (0, 0.0)
    refused, wait = try_take(bucket, 1, capacity=2, per_second=0.5, now=0)
    assert refused.level == 0 and wait == pytest.approx(2.0)  # one unit at 0.5 per second
    _, wait = try_take(bucket, 1, capacity=2, per_second=0.5, now=1.5)
    assert wait == pytest.approx(0.5)
    _, wait = try_take(bucket, 1, capacity=2, per_second=0.5, now=2.0)
    assert wait == 0.0


def test_a_cost_above_capacity_waits_for_a_full_bucket_and_leaves_debt() -> None:
    refused, wait = try_take(Bucket(50, 0), 150, capacity=100, per_second=1, now=0)
    assert wait == pytest.approx(50)  # until full, not until 150 (that would never come)
    taken, wait = try_take(Bucket(100, 0), 150, capacity=100, per_second=1, now=0)
    assert (taken.level, wait) == (-50, 0.0)
    _, wait = try_take(taken, 1, capacity=100, per_second=1, now=0)
    assert wait == pytest.approx(51)  # the debt is paid off first


def test_debit_goes_below_zero() -> None:
    assert debit(Bucket(5, 0), 20, capacity=10, per_second=1, now=0) == Bucket(-15, 0)


@pytest.mark.parametrize(("seconds", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (59.5, "60")])
def test_retry_after_rounds_up_to_whole_seconds(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


def _refusal(call) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        call()
    return caught.value


def test_requests_per_minute_per_key() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=3, tokens_per_minute=0, clock=clock)
    for _ in range(3):
        limiter.admit_request("a")
    error = _refusal(lambda: limiter.admit_request("a"))
    assert (error.status, error.code, error.type) == (429, "rate_limit_exceeded", "requests")
    assert error.headers == {"retry-after": "20"}  # one request per 20 s
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    limiter.admit_request("b")  # another key has its own bucket
    clock.now += 20
    limiter.admit_request("a")


def test_tokens_per_minute_charge_up_front_and_settle_after() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=0, tokens_per_minute=600, clock=clock)  # 10 per second
    limiter.admit_tokens("a", 400)
    limiter.charge_tokens("a", 300)  # the completion: 200 - 300 = -100 left
    error = _refusal(lambda: limiter.admit_tokens("a", 10))
    assert (error.status, error.type, error.headers["retry-after"]) == (429, "tokens", "11")
    clock.now += 11
    limiter.admit_tokens("a", 10)


def test_limits_of_zero_are_off() -> None:
    refused: list[str] = []
    limiter = RateLimiter(0, 0, clock=Clock(), on_refused=refused.append)
    admitted = 0
    for _ in range(10_000):
        limiter.admit_request("a")  # raises ProxyError(429) if a limit applied
        limiter.admit_tokens("a", 10**9)
        admitted += 1
    assert admitted == 10_000 and refused == []
    # The same loop under a limit of 1 is refused at once: the loop above could have failed.
    limited = RateLimiter(1, 0, clock=Clock(), on_refused=refused.append)
    limited.admit_request("a")
    assert _refusal(lambda: limited.admit_request("a")).status == 429 and refused == ["requests"]


def test_settlement_charges_completion_and_prompt_beyond_the_count() -> None:
    assert tokens_to_settle(100, None) == 0
    assert tokens_to_settle(100, UpstreamUsage(prompt_tokens=98, completion_tokens=7)) == 7
    assert tokens_to_settle(0, UpstreamUsage(prompt_tokens=50, completion_tokens=None)) == 50


def test_concurrency_gate_admits_up_to_its_cap() -> None:
    gate = ConcurrencyGate(2)
    assert gate.enter() and gate.enter()
    assert not gate.enter()
    gate.leave()
    assert gate.enter()
    unlimited = ConcurrencyGate(0)
    assert all(unlimited.enter() for _ in range(1000))


def test_each_refusal_is_reported_once_with_its_limit() -> None:
    refused: list[str] = []
    limiter = RateLimiter(requests_per_minute=1, tokens_per_minute=60, clock=Clock(), on_refused=refused.append)
    limiter.admit_request("a")
    limiter.admit_tokens("a", 60)
    assert refused == []  # admitted work is not a refusal
    _refusal(lambda: limiter.admit_request("a"))
    _refusal(lambda: limiter.admit_tokens("a", 1))
    assert refused == ["requests", "tokens"]


def test_the_concurrency_cap_reports_what_it_refuses() -> None:
    import asyncio

    from ccproxy.limits import ConcurrencyLimitMiddleware

    release = asyncio.Event()
    refusals: list[str] = []

    async def slow_app(scope, receive, send) -> None:
        if scope["path"] == "/v1/chat/completions":
            await release.wait()

    async def run() -> list[int]:
        middleware = ConcurrencyLimitMiddleware(
            slow_app, cap=1, limited=lambda path: path == "/v1/chat/completions", on_refused=lambda: refusals.append("overloaded")
        )
        statuses: list[int] = []

        async def send(message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": []}
        holder = asyncio.create_task(middleware(scope, receive, send))
        await asyncio.sleep(0)  # the first request takes the only slot
        await middleware(scope, receive, send)
        await middleware({**scope, "path": "/livez"}, receive, send)  # not a capped path
        release.set()
        await holder
        return statuses

    assert asyncio.run(run()) == [503]
    assert refusals == ["overloaded"]
