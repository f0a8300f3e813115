"""Every upstream fault through the served gateway: the caller's status and body, and the usage event.

The upstream is tests/e2e/fault_upstream.py (the request's model picks the fault); the gateway
waits 2 s for it (CCPROXY_UPSTREAM_READ_TIMEOUT_S). A connect failure uses
``dead_upstream_gateway``, whose upstream port has no listener. The outcomes are the table of
docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from harness.servers import create_key
from tests.e2e.conftest import FAULT_UPSTREAM_KEY
from tests.e2e.usage_db import account_events

pytestmark = pytest.mark.e2e

ACCOUNT = "faults"
MESSAGES = [{"role": "user", "content": "Say hello."}]
ERROR_FIELDS = {"message", "type", "param", "code"}


@dataclass(frozen=True)
class Fault:
    model: str
    stream: bool
    status: int  # what the caller's status line says
    code: str | None  # ccproxy's own error code; None: the upstream's answer is relayed
    event_status: int  # the status in the usage event
    # The upstream had started its answer when it failed: the provider bills the request, so
    # the usage event carries the prompt (ccproxy's count: the usage never arrived).
    billed: bool = False


OWN_ERRORS = [
    Fault("fault-hang-headers", False, 504, "upstream_timeout", 504),
    Fault("fault-hang-headers", True, 504, "upstream_timeout", 504),
    Fault("fault-hang-mid-stream", False, 504, "upstream_timeout", 504, billed=True),
    Fault("fault-reset-headers", False, 502, "upstream_connection_error", 502),
    Fault("fault-reset-headers", True, 502, "upstream_connection_error", 502),
    Fault("fault-reset-mid-stream", False, 502, "upstream_connection_error", 502, billed=True),
]
BROKEN_STREAMS = [  # the status line (200) was sent already: the error comes as the last event
    Fault("fault-hang-mid-stream", True, 200, "upstream_timeout", 504),
    Fault("fault-reset-mid-stream", True, 200, "upstream_connection_error", 502),
]
RELAYED = [
    Fault("fault-429", False, 429, None, 429),
    Fault("fault-429", True, 429, None, 429),
    Fault("fault-500", False, 500, None, 500),
    Fault("fault-503", False, 503, None, 503),
    Fault("fault-503", True, 503, None, 503),
    Fault("fault-invalid-json", False, 200, None, 200),
    Fault("fault-invalid-json", True, 200, None, 200),  # JSON to a stream request: relayed whole
]


def _id(fault: Fault) -> str:
    return f"{fault.model}-{'stream' if fault.stream else 'whole'}"


@pytest.fixture(scope="module")
def key(database_url: str) -> str:
    return create_key({"CCPROXY_DATABASE_URL": database_url}, ACCOUNT)


def _send(base: str, headers: dict[str, str], model: str, stream: bool) -> tuple[httpx.Response, bytes, float]:
    started = time.monotonic()
    body = {"model": model, "messages": MESSAGES, "stream": stream}
    with httpx.stream("POST", f"{base}/chat/completions", json=body, headers=headers, timeout=30) as response:
        data = response.read()
    return response, data, time.monotonic() - started


def _via_gateway(gateway: str, key: str, fault: Fault) -> tuple[httpx.Response, bytes, float]:
    return _send(f"{gateway}/v1", {"x-api-key": key}, fault.model, fault.stream)


def _event(database_url: str, account: str, model: str, stream: bool, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in account_events(database_url, account) if e["model"] == model and e["stream"] == stream]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no usage event for {model} (stream={stream})")


def _data_events(stream_text: str) -> list[str]:
    return [line[len("data: "):] for line in stream_text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("fault", OWN_ERRORS, ids=_id)
def test_faults_before_the_answer_started_get_an_openai_shaped_gateway_error(
    faults_gateway: str, key: str, database_url: str, fault: Fault
) -> None:
    response, data, elapsed = _via_gateway(faults_gateway, key, fault)
    assert response.status_code == fault.status
    error = json.loads(data)["error"]
    assert set(error) == ERROR_FIELDS
    assert (error["type"], error["code"]) == ("upstream_error", fault.code)
    assert elapsed < 10  # bounded by the 2 s read timeout, never a hang
    event = _event(database_url, ACCOUNT, fault.model, fault.stream)
    assert (event["status"], event["prompt_tokens"]) == (fault.event_status, None)
    if fault.billed:
        assert event["tokens_after"] > 0  # the prompt reached the upstream, which bills it
    else:
        assert event["tokens_after"] == 0  # refused before the upstream took it: nothing billed


@pytest.mark.parametrize("fault", BROKEN_STREAMS, ids=_id)
def test_a_stream_that_breaks_ends_with_an_error_event(
    faults_gateway: str, key: str, database_url: str, fault: Fault
) -> None:
    response, data, elapsed = _via_gateway(faults_gateway, key, fault)
    assert response.status_code == 200
    events = _data_events(data.decode())
    assert "Hel" in events[0]  # what the upstream sent before it broke reached the caller
    last = json.loads(events[-1])
    assert set(last["error"]) == ERROR_FIELDS and last["error"]["code"] == fault.code
    assert "[DONE]" not in events
    assert elapsed < 10
    event = _event(database_url, ACCOUNT, fault.model, fault.stream)
    assert event["status"] == fault.event_status
    # Billed for what reached the upstream: the prompt, and the completion it had streamed.
    assert event["tokens_after"] > 0 and event["completion_tokens"] >= 1


def test_a_stream_the_caller_drops_is_billed_for_what_reached_the_upstream(
    faults_gateway: str, key: str, database_url: str
) -> None:
    model = "fault-hang-mid-stream:dropped"
    body = {"model": model, "messages": MESSAGES, "stream": True}
    with httpx.stream(
        "POST", f"{faults_gateway}/v1/chat/completions", json=body, headers={"x-api-key": key}, timeout=30
    ) as response:
        first = next(response.iter_lines())  # the answer has started; the caller walks away
    assert response.status_code == 200 and first.startswith("data: ")
    event = _event(database_url, ACCOUNT, model, True)
    assert event["status"] == 499
    assert event["tokens_after"] > 0 and event["completion_tokens"] >= 1


def test_the_openai_sdk_raises_on_a_broken_stream(faults_gateway: str, key: str) -> None:
    client = openai.OpenAI(base_url=f"{faults_gateway}/v1", api_key=key, max_retries=0, timeout=30)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="fault-reset-mid-stream:sdk", messages=MESSAGES, stream=True):
            pass


@pytest.mark.parametrize("fault", RELAYED, ids=_id)
def test_upstream_answers_are_relayed_as_they_came(
    fault_upstream: str, faults_gateway: str, key: str, database_url: str, fault: Fault
) -> None:
    direct, direct_data, _ = _send(
        fault_upstream, {"authorization": f"Bearer {FAULT_UPSTREAM_KEY}"}, fault.model, fault.stream
    )
    proxied, proxied_data, _ = _via_gateway(faults_gateway, key, fault)
    assert (proxied.status_code, proxied_data) == (direct.status_code, direct_data) == (fault.status, direct_data)
    assert proxied.headers.get("retry-after") == direct.headers.get("retry-after")
    # The gateway holds the upstream key: the upstream account's rate-limit state, organization
    # and project are the server's, not the caller's (relayed with a caller's own key:
    # tests/e2e/test_security.py).
    for header in ("x-ratelimit-remaining-requests", "openai-organization", "openai-project"):
        assert header not in proxied.headers
    event = _event(database_url, ACCOUNT, fault.model, fault.stream)
    assert event["status"] == fault.event_status
    if fault.status >= 400:
        assert event["tokens_after"] == 0
    else:  # a 200 the upstream could not express in JSON: our own count, no upstream usage
        assert event["tokens_after"] > 0 and event["prompt_tokens"] is None


def test_a_429_reaches_the_sdk_with_its_retry_after(faults_gateway: str, key: str) -> None:
    client = openai.OpenAI(base_url=f"{faults_gateway}/v1", api_key=key, max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="fault-429:sdk", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"


def test_a_malformed_event_is_relayed_and_the_stream_completes(
    faults_gateway: str, key: str, database_url: str
) -> None:
    response, data, _ = _via_gateway(faults_gateway, key, Fault("fault-malformed-sse", True, 200, None, 200))
    assert response.status_code == 200
    assert b"data: {this is not json\n\n" in data and b"\xff\xfe broken utf-8" in data
    events = _data_events(data.decode("utf-8", errors="replace"))
    assert events[-1] == "[DONE]"
    assert not any('"usage"' in e for e in events)  # ccproxy asked for usage; the caller did not
    event = _event(database_url, ACCOUNT, "fault-malformed-sse", True)
    assert (event["status"], event["prompt_tokens"], event["completion_tokens"]) == (200, 11, 3)


def test_a_normal_answer_for_comparison(faults_gateway: str, key: str, database_url: str) -> None:
    for stream in (False, True):
        response, data, _ = _via_gateway(faults_gateway, key, Fault("fault-ok", stream, 200, None, 200))
        assert response.status_code == 200
        assert (b"[DONE]" in data) == stream
        event = _event(database_url, ACCOUNT, "fault-ok", stream)
        assert (event["status"], event["prompt_tokens"], event["completion_tokens"]) == (200, 11, 3)


def test_connect_failures_are_retried_then_502(dead_upstream_gateway: str, api_key: str, database_url: str) -> None:
    model = "connect-refused-probe"
    response, data, elapsed = _send(f"{dead_upstream_gateway}/v1", {"x-api-key": api_key}, model, False)
    assert response.status_code == 502
    error = json.loads(data)["error"]
    assert set(error) == ERROR_FIELDS and error["code"] == "upstream_unreachable"
    assert elapsed >= 0.3  # the two retries' back-off (0.1 s + 0.2 s) was spent before giving up
    event = _event(database_url, "e2e", model, False)
    assert (event["status"], event["tokens_after"]) == (502, 0)
