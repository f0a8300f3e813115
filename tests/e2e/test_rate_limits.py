"""The per-key rate limits and the per-worker concurrency cap, through a served gateway.

One gateway (one worker) in front of the fault upstream: 3 requests and 400 tokens per minute
per key, at most 2 chat requests at once. Each test uses its own key, since limits are per key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.servers import bentoml_serve, create_key, free_port, running
from tests.e2e.conftest import gateway_env
from tests.e2e.usage_db import wait_for_events

pytestmark = pytest.mark.e2e

TIMEOUT = httpx.Timeout(30, connect=5)
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def limited_gateway(fault_upstream: str, remote_compressor: str, database_url: str, logs_dir: Path) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **gateway_env(fault_upstream, remote_compressor, database_url, logs_dir / "limited-data"),
        "CCPROXY_RATE_LIMIT_REQUESTS_PER_MINUTE": "3",
        "CCPROXY_RATE_LIMIT_TOKENS_PER_MINUTE": "400",
        "CCPROXY_MAX_CONCURRENT_REQUESTS": "2",
    }
    with running(bentoml_serve(port), probe_url=f"{base}/livez", log=logs_dir / "limited.log", env=env):
        yield base


@pytest.fixture
def new_key(database_url: str):
    def make(account: str) -> str:
        return create_key({"CCPROXY_DATABASE_URL": database_url}, account)

    return make


def _chat(base: str, key: str, content: str = "hi", model: str = "fault-ok") -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions", headers={"x-api-key": key}, timeout=TIMEOUT,
        json={"model": model, "messages": [{"role": "user", "content": content}]},
    )


def _assert_limited(response: httpx.Response, status: int, kind: str, code: str) -> int:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and (error["type"], error["code"]) == (kind, code)
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


def _refused(base: str, reason: str) -> float:
    """``requests_refused_total{reason=...}`` on the gateway's /metrics (0 before the first)."""
    response = httpx.get(f"{base}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    wanted = f'requests_refused_total{{reason="{reason}"}}'
    values = [float(line.rpartition(" ")[2]) for line in response.text.splitlines() if line.startswith(wanted + " ")]
    return values[0] if values else 0.0


def test_requests_per_minute_per_key(limited_gateway: str, new_key, database_url: str) -> None:
    key, other = new_key("rpm-a"), new_key("rpm-b")
    refused_before = _refused(limited_gateway, "requests_per_minute")
    assert [_chat(limited_gateway, key).status_code for _ in range(3)] == [200, 200, 200]
    retry_after = _assert_limited(_chat(limited_gateway, key), 429, "requests", "rate_limit_exceeded")
    assert _refused(limited_gateway, "requests_per_minute") == refused_before + 1
    assert retry_after <= 20  # one request comes back every 60 / 3 s
    assert _chat(limited_gateway, other).status_code == 200  # another key is not affected
    time.sleep(1)  # a refused request is not usage: three events, not four
    assert len(wait_for_events(database_url, "rpm-a", 3)) == 3


def test_tokens_per_minute_per_key(limited_gateway: str, new_key) -> None:
    key = new_key("tpm")
    long_prompt = "word " * 300  # ~300 prompt tokens against a budget of 400 per minute
    refused_before = _refused(limited_gateway, "tokens_per_minute")
    assert _chat(limited_gateway, key, long_prompt).status_code == 200
    retry_after = _assert_limited(_chat(limited_gateway, key, long_prompt), 429, "tokens", "rate_limit_exceeded")
    assert _refused(limited_gateway, "tokens_per_minute") == refused_before + 1
    assert retry_after <= 60


def test_concurrency_cap_per_worker(limited_gateway: str, new_key) -> None:
    key = new_key("concurrency")
    refused_before = _refused(limited_gateway, "overloaded")
    results: list[httpx.Response] = []

    def slow() -> None:  # the upstream holds each of these for 3 s
        results.append(_chat(limited_gateway, key, model="fault-slow"))

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    third = _chat(limited_gateway, key)
    for thread in threads:
        thread.join()
    _assert_limited(third, 503, "server_error", "server_overloaded")
    assert [r.status_code for r in results] == [200, 200]
    assert _refused(limited_gateway, "overloaded") == refused_before + 1
    assert _chat(limited_gateway, key).status_code == 200  # the slots are free again
