"""Compression through the served Bento: fewer prompt tokens reach the upstream."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e


def test_compression_sends_fewer_prompt_tokens_upstream(embedded_gateway: str, embedded_key: str, rag_item) -> None:
    client = openai.OpenAI(base_url=f"{embedded_gateway}/v1", api_key=embedded_key, max_retries=0)
    request = {"model": "m", "messages": rag_item.messages(), "max_tokens": 8, "temperature": 0}
    full = client.chat.completions.with_raw_response.create(
        **request, extra_headers={"X-Compression": "off"}
    )
    compressed = client.chat.completions.with_raw_response.create(
        **request, extra_headers={"X-Compression-Ratio": "0.3"}
    )
    assert full.headers["x-compression"] == "disabled"
    assert compressed.headers["x-compression"] == "compressed"
    full_tokens = full.parse().usage.prompt_tokens
    compressed_tokens = compressed.parse().usage.prompt_tokens
    assert compressed_tokens < 0.5 * full_tokens
    before, after, saved = (int(compressed.headers[f"x-tokens-{k}"]) for k in ("before", "after", "saved"))
    assert before - after == saved > 0


def test_stream_is_compressed_too(embedded_gateway: str, embedded_key: str, rag_item) -> None:
    body = {"model": "m", "messages": rag_item.messages(), "max_tokens": 4, "stream": True,
            "ccproxy": {"ratio": 0.3}}
    with httpx.stream(
        "POST", f"{embedded_gateway}/v1/chat/completions", json=body, headers={"x-api-key": embedded_key}, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-compression"] == "compressed"
        assert int(response.headers["x-tokens-saved"]) > 0
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_compress_endpoint_keeps_the_gold_passage(embedded_gateway: str, embedded_key: str, rag_item) -> None:
    response = httpx.post(
        f"{embedded_gateway}/v1/compress",
        json={"messages": rag_item.messages(), "ratio": 0.2},
        headers={"x-api-key": embedded_key},
        timeout=120,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["outcome"] == "compressed"
    assert rag_item.record.gold.text in body["messages"][0]["content"]
    assert rag_item.question in body["messages"][0]["content"]
    kept_units = [u for u in body["units"] if u["kept"] and not u["protected"]]
    assert sum(u["kept_tokens"] for u in kept_units) <= 0.2 * sum(u["tokens"] for u in body["units"] if not u["protected"])


def test_compress_endpoint_validates_its_body(embedded_gateway: str, embedded_key: str) -> None:
    response = httpx.post(
        f"{embedded_gateway}/v1/compress", json={"messages": [], "ratio": 2}, headers={"x-api-key": embedded_key}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
