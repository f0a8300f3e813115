"""Which credentials and headers cross the proxy, and how llama.cpp options are mapped."""

from __future__ import annotations

import httpx
import pytest

from ccproxy.embedded import llama_options
from ccproxy.protocol import ProxyError
from ccproxy.upstream import relayed_headers, transport_error, upstream_request_headers


def test_server_key_replaces_the_callers_credentials() -> None:
    caller = {"Authorization": "Bearer caller", "OpenAI-Organization": "org-caller"}
    assert upstream_request_headers(caller, "sk-server") == {"authorization": "Bearer sk-server"}


def test_caller_credentials_pass_through_without_a_server_key() -> None:
    caller = {
        "Authorization": "Bearer sk-caller",
        "OpenAI-Project": "proj",
        "Cookie": "session=1",
        "X-Api-Key": "ccproxy-key",
    }
    assert upstream_request_headers(caller, None) == {
        "authorization": "Bearer sk-caller",
        "openai-project": "proj",
    }


def test_only_rate_limit_and_openai_headers_are_relayed() -> None:
    upstream = {
        "x-ratelimit-remaining-tokens": "10",
        "retry-after": "3",
        "openai-processing-ms": "12",
        "set-cookie": "tracking=1",
        "x-request-id": "up-1",
        "server": "nginx",
    }
    assert relayed_headers(upstream) == {
        "x-ratelimit-remaining-tokens": "10",
        "retry-after": "3",
        "openai-processing-ms": "12",
        "x-upstream-request-id": "up-1",
    }


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (httpx.ConnectError("refused"), 502, "upstream_unreachable"),
        (httpx.ConnectTimeout("slow"), 504, "upstream_timeout"),
        (httpx.ReadTimeout("slow"), 504, "upstream_timeout"),
        (httpx.RemoteProtocolError("reset"), 502, "upstream_connection_error"),
    ],
)
def test_transport_errors_map_to_gateway_statuses(exc: httpx.HTTPError, status: int, code: str) -> None:
    error = transport_error(exc)
    assert (error.status, error.code, error.type) == (status, code, "upstream_error")


def test_llama_options_keep_shared_sampling_options_and_drop_the_rest() -> None:
    options = llama_options(
        {
            "model": "x",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "temperature": 0,
            "max_completion_tokens": 12,
            "logit_bias": {"42": -100},
            "user": "someone",
            "store": True,
        }
    )
    assert options == {
        "messages": [{"role": "user", "content": "ab"}],
        "temperature": 0,
        "max_tokens": 12,
        "logit_bias": {42: -100.0},
    }


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "a"}], "n": 2},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    ],
)
def test_llama_options_refuse_what_the_embedded_model_cannot_do(body: dict) -> None:
    with pytest.raises(ProxyError) as caught:
        llama_options(body)
    assert caught.value.status == 400


def test_a_server_held_key_keeps_its_accounts_headers_from_callers() -> None:
    upstream = {
        "x-ratelimit-remaining-tokens": "10",
        "x-ratelimit-limit-requests": "5000",
        "openai-organization": "org-server",
        "openai-project": "proj_server",
        "openai-processing-ms": "12",
        "retry-after": "3",
        "x-request-id": "up-1",
    }
    assert relayed_headers(upstream, server_holds_key=True) == {
        "openai-processing-ms": "12",
        "retry-after": "3",
        "x-upstream-request-id": "up-1",
    }
    # With the caller's own key they are the caller's own account's: relayed.
    passed = {name: value for name, value in upstream.items() if name != "x-request-id"}
    assert relayed_headers(upstream, server_holds_key=False) == {**passed, "x-upstream-request-id": "up-1"}
