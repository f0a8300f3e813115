"""Hostile input and failing upstreams, below the HTTP server: depth, Unicode, retries, redaction,
logs. The upstream here is httpx.MockTransport (no socket); the served version of each case is in
tests/e2e/test_faults.py and tests/e2e/test_bad_input.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from ccproxy.app import exception_summary
from ccproxy.openapi import inlined_schema
from ccproxy.protocol import (
    MAX_JSON_DEPTH,
    ChatCompletionRequest,
    ProxyError,
    json_depth,
    parse_chat_request,
)
from ccproxy.settings import Settings
from ccproxy.upstream import HttpUpstream, connect_retry_delay, redact


def _nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return value


def test_depth_is_measured_without_recursion() -> None:
    assert json_depth(b'{"a": [1, {"b": []}]}') == 4  # object, array, object, array
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000  # would overflow a recursive walk
    assert json_depth(b'"no brackets"') == 0


def test_depth_ignores_brackets_inside_strings() -> None:
    raw = json.dumps({"a": '[[[[\\"{{{', "b": [[[["]]]]"]]]], "c": "\\"}).encode()
    assert json_depth(raw) == 5


def test_depth_is_exact_across_chunks() -> None:
    wide = json.dumps({"parts": [{"type": "x"}] * 100_000, "deep": _nested(40)}).encode()
    assert json_depth(wide) == 40  # the object, then _nested(40)'s 39 arrays


def test_bodies_nested_past_the_limit_are_refused_even_when_json_could_parse_them() -> None:
    # 500 levels parse fine but would break re-encoding the body for the upstream.
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": _nested(500)}
    with pytest.raises(ProxyError) as caught:
        parse_chat_request(json.dumps(body).encode())
    assert caught.value.status == 400 and "nested too deeply" in caught.value.message
    ok = {**body, "x": _nested(MAX_JSON_DEPTH - 1)}
    assert parse_chat_request(json.dumps(ok).encode())[0] == ok


def test_a_lone_surrogate_escape_is_refused_and_a_pair_is_kept() -> None:
    lone = b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    with pytest.raises(ProxyError) as caught:
        parse_chat_request(lone)
    assert caught.value.status == 400 and "surrogate" in caught.value.message
    pair = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert parse_chat_request(pair)[0]["messages"][0]["content"] == "\U0001f600"


def _upstream(handler, retries: int = 2) -> HttpUpstream:
    settings = Settings(
        upstream_url="http://upstream.test/v1",
        upstream_api_key="sk-server-secret-123",
        upstream_connect_retries=retries,
    )
    return HttpUpstream(settings, transport=httpx.MockTransport(handler))


def _chat(upstream: HttpUpstream):
    return asyncio.run(upstream.chat_completions({"model": "m", "messages": []}, {}, stream=False))


@pytest.mark.parametrize("error", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")])
def test_connect_failures_are_retried_a_bounded_number_of_times(error: httpx.HTTPError) -> None:
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) < 3:
            raise error
        return httpx.Response(200, json={"ok": True})

    assert _chat(_upstream(handler, retries=2)).status == 200
    assert len(attempts) == 3

    attempts.clear()
    with pytest.raises(ProxyError) as caught:
        _chat(_upstream(handler, retries=1))
    assert len(attempts) == 2 and caught.value.status in (502, 504)


@pytest.mark.parametrize(
    "error", [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("reset"), httpx.ReadError("reset")]
)
def test_failures_after_the_request_may_have_left_are_never_retried(error: httpx.HTTPError) -> None:
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        raise error

    with pytest.raises(ProxyError):
        _chat(_upstream(handler, retries=5))
    assert len(attempts) == 1


def test_a_pooled_connection_the_upstream_closed_is_retried_once_on_a_fresh_one() -> None:
    """llama-server closes every connection after a stream: the next request on it fails before
    any answer ("Server disconnected without sending a response"), once, then goes through."""
    attempts: list[int] = []
    stale = httpx.RemoteProtocolError("Server disconnected without sending a response.")

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            raise stale
        return httpx.Response(200, json={"ok": True})

    assert _chat(_upstream(handler, retries=0)).status == 200
    assert len(attempts) == 2

    def always_stale(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        raise stale

    attempts.clear()
    with pytest.raises(ProxyError) as caught:
        _chat(_upstream(always_stale, retries=0))
    assert len(attempts) == 2 and caught.value.status == 502  # once, never twice


def test_retry_delays_grow_and_stay_short() -> None:
    delays = [connect_retry_delay(attempt) for attempt in range(6)]
    assert delays == sorted(delays) and delays[0] > 0 and max(delays) <= 1.0


def test_the_server_key_is_redacted_from_relayed_error_bodies_and_headers() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        sent = request.headers["authorization"]
        return httpx.Response(
            401, json={"error": {"message": f"bad key {sent}"}}, headers={"openai-echo": sent}
        )

    reply = _chat(_upstream(handler))
    assert reply.status == 401
    assert b"sk-server-secret-123" not in reply.body and b"[redacted]" in reply.body
    assert "sk-server-secret-123" not in json.dumps(reply.headers)
    assert redact(b"abc", None) == b"abc"


def test_exception_summaries_name_the_type_and_place_but_not_the_message() -> None:
    try:
        raise ValueError("prompt text sk-secret")
    except ValueError as exc:
        summary = exception_summary(exc)
    assert "ValueError" in summary and "test_reliability_rules.py" in summary
    assert "prompt text" not in summary and "sk-secret" not in summary


def test_the_declared_request_schema_is_self_contained() -> None:
    schema = inlined_schema(ChatCompletionRequest)
    assert "$defs" not in json.dumps(schema) and "$ref" not in json.dumps(schema)
    assert schema["required"] == ["model", "messages"]


def _failing_app(after_start: bool):
    async def app(scope, receive, send) -> None:
        if after_start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("the prompt said sk-caller-secret")

    return app


@pytest.mark.parametrize("after_start", [False, True])
def test_an_unexpected_error_is_logged_without_its_message(after_start: bool, caplog: pytest.LogCaptureFixture) -> None:
    from ccproxy.app import RequestContextMiddleware

    sent: list[dict] = []
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"x-request-id", b"req-1")]}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    with caplog.at_level("ERROR", logger="ccproxy"):
        # No exception escapes to the server, which would log it with its message.
        asyncio.run(RequestContextMiddleware(_failing_app(after_start))(scope, receive, send))
    start = sent[0]
    assert (b"x-request-id", b"req-1") in start["headers"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    if after_start:
        assert body == b"partial"  # unfinished: the server closes the connection
    else:
        assert start["status"] == 500
        assert json.loads(body)["error"]["type"] == "server_error"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "ValueError" in logged and "req-1" in logged
    assert "sk-caller-secret" not in logged and "prompt" not in logged
    assert all(record.exc_info is None for record in caplog.records)  # no traceback with the message
