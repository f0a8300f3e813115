"""The Gateway's spending checks, served: the model allow-list and the per-key monthly cap.

A Gateway in front of the fault upstream allows `fault-ok` only, and caps each key at a spend
that one answered request passes (the price table makes a `fault-ok` request cost more than
the cap). The checks run before any compression work or forwarding; `/v1/compress` obeys them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.servers import create_key
from tests.e2e.conftest import FAULT_UPSTREAM_KEY, _gateway_to
from tests.e2e.usage_db import wait_for_events

pytestmark = pytest.mark.e2e

PRICES = {"default": {"input": "1000000", "output": "1000000"}, "compress": {"input": "1000000"}}
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def spending_gateway(
    fault_upstream: str, remote_compressor: str, database_url: str, logs_dir: Path
) -> Iterator[str]:
    yield from _gateway_to(
        fault_upstream, remote_compressor, database_url, logs_dir, "spending",
        CCPROXY_UPSTREAM_API_KEY=FAULT_UPSTREAM_KEY,
        CCPROXY_ALLOWED_MODELS=json.dumps(["fault-ok", "fault-slow*"]),
        CCPROXY_BILLING_PRICES=json.dumps(PRICES),  # 1 per token: one request passes the cap
        CCPROXY_SPEND_CAP_PER_KEY_MONTHLY="5",
        CCPROXY_SPEND_CAP_CACHE_S="0",
    )


def _chat(base: str, key: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions", headers={"x-api-key": key}, timeout=30,
        json={"model": model, "messages": HELLO},
    )


def test_a_model_off_the_list_is_refused_before_it_is_forwarded(spending_gateway: str, database_url: str) -> None:
    key = create_key({"CCPROXY_DATABASE_URL": database_url}, "spending-models")
    refused = _chat(spending_gateway, key, "fault-500")
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_allowed", "model")
    assert "fault-500" not in error["message"]
    compress = httpx.post(
        f"{spending_gateway}/v1/compress", headers={"x-api-key": key}, timeout=30,
        json={"model": "gpt-4o", "messages": HELLO},
    )
    assert compress.status_code == 403
    assert _chat(spending_gateway, key, "fault-ok").status_code == 200


def test_a_key_over_its_monthly_cap_gets_429_and_another_key_does_not(
    spending_gateway: str, database_url: str
) -> None:
    env = {"CCPROXY_DATABASE_URL": database_url}
    spender, other = create_key(env, "spending-cap"), create_key(env, "spending-other")
    assert _chat(spending_gateway, spender, "fault-ok").status_code == 200  # ~20 tokens: 20 > 5
    wait_for_events(database_url, "spending-cap", 1)
    deadline = time.monotonic() + 30
    while (answer := _chat(spending_gateway, spender, "fault-ok")).status_code == 200:
        assert time.monotonic() < deadline, "the cap never bit"
        time.sleep(0.5)  # the hourly rows trail the events by one flush
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "spend_cap_reached"
    assert _chat(spending_gateway, other, "fault-ok").status_code == 200
