"""The gateway in front of llama.cpp's own OpenAI server: answers, errors and keys relayed."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import UPSTREAM_KEY

pytestmark = pytest.mark.e2e

MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a primary colour."},
]
GREEDY = {"model": "smollm2-upstream", "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "seed": 1}


def _client(base: str, key: str, ccproxy_key: str | None = None) -> openai.OpenAI:
    headers = {"X-API-Key": ccproxy_key} if ccproxy_key else None
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, default_headers=headers)


def test_non_stream_answer_equals_the_direct_answer(
    llama_upstream: str, passthrough_gateway: str, api_key: str
) -> None:
    direct = _client(llama_upstream, UPSTREAM_KEY).chat.completions.create(**GREEDY)
    proxied = _client(f"{passthrough_gateway}/v1", UPSTREAM_KEY, api_key).chat.completions.create(**GREEDY)
    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.usage.prompt_tokens == direct.usage.prompt_tokens


def test_stream_equals_the_direct_stream(llama_upstream: str, passthrough_gateway: str, api_key: str) -> None:
    def text(client: openai.OpenAI) -> tuple[str, int]:
        chunks = list(client.chat.completions.create(**GREEDY, stream=True))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), len(chunks)

    direct_text, direct_chunks = text(_client(llama_upstream, UPSTREAM_KEY))
    proxied_text, proxied_chunks = text(_client(f"{passthrough_gateway}/v1", UPSTREAM_KEY, api_key))
    assert proxied_text == direct_text
    assert proxied_chunks == direct_chunks >= 3


def test_callers_key_is_passed_through_and_a_wrong_one_relayed_as_401(
    passthrough_gateway: str, api_key: str
) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(f"{passthrough_gateway}/v1", "sk-wrong", api_key).chat.completions.create(**GREEDY)
    assert caught.value.code not in ("invalid_api_key", "missing_api_key")  # the upstream's 401, not ours


def test_with_the_server_key_held_the_sdk_api_key_is_the_ccproxy_key(keyed_gateway: str, api_key: str) -> None:
    client = _client(f"{keyed_gateway}/v1", api_key)  # a plain OpenAI SDK set-up, nothing else
    assert client.chat.completions.create(**GREEDY).choices[0].message.content
    assert [m.id for m in client.models.list()] == ["smollm2-upstream"]
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(f"{keyed_gateway}/v1", "sk-anything").chat.completions.create(**GREEDY)
    assert caught.value.code == "invalid_api_key"


def test_upstream_error_status_and_body_are_relayed_unchanged(
    llama_upstream: str, keyed_gateway: str, api_key: str
) -> None:
    too_long = {**GREEDY, "messages": [{"role": "user", "content": "word " * 5000}]}
    headers = {"authorization": f"Bearer {UPSTREAM_KEY}"}
    direct = httpx.post(f"{llama_upstream}/chat/completions", json=too_long, headers=headers, timeout=60)
    proxied = httpx.post(
        f"{keyed_gateway}/v1/chat/completions", json=too_long, headers={"x-api-key": api_key}, timeout=60
    )
    assert direct.status_code >= 400
    assert (proxied.status_code, proxied.json()) == (direct.status_code, direct.json())


def test_unreachable_upstream_is_502_and_not_ready(dead_upstream_gateway: str, api_key: str) -> None:
    assert httpx.get(f"{dead_upstream_gateway}/readyz").status_code == 503
    with pytest.raises(openai.APIStatusError) as caught:
        _client(f"{dead_upstream_gateway}/v1", "k", api_key).chat.completions.create(**GREEDY)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"
