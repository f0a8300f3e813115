"""The served Bento with no upstream configured, driven by the official ``openai`` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture()
def client(embedded_gateway: str, embedded_key: str) -> openai.OpenAI:
    # The embedded model needs no provider key: the SDK's api_key is the ccproxy key.
    return openai.OpenAI(base_url=f"{embedded_gateway}/v1", api_key=embedded_key, max_retries=0)


@pytest.fixture()
def auth(embedded_key: str) -> dict[str, str]:
    return {"x-api-key": embedded_key}


def test_readyz_and_models(embedded_gateway: str, client: openai.OpenAI) -> None:
    assert httpx.get(f"{embedded_gateway}/readyz").status_code == 200
    assert [model.id for model in client.models.list()] == ["SmolLM2-135M-Instruct"]


def test_non_stream_answer_has_content_usage_and_request_id(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=16, temperature=0
    )
    assert raw.headers["x-request-id"].startswith("req_")
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.strip()
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage.prompt_tokens > 10
    assert 0 < completion.usage.completion_tokens <= 16


def test_stream_arrives_in_several_chunks_then_ends(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=16, temperature=0, stream=True
        )
    )
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 2
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert all(chunk.usage is None for chunk in chunks)


def test_stream_is_relayed_as_sse_with_done_and_usage_when_asked(embedded_gateway: str, auth: dict) -> None:
    body = {
        "model": "m",
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", f"{embedded_gateway}/v1/chat/completions", json=body, headers=auth, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert not any("ccproxy-status" in line for line in events)
    usage_chunk = json.loads(events[-2].removeprefix("data: "))
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] > 10
    assert 0 < usage_chunk["usage"]["completion_tokens"] <= 8


def test_stream_and_non_stream_usage_agree(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="m", messages=QUESTION, max_tokens=12, temperature=0
    )
    streamed = list(
        client.chat.completions.create(
            model="m",
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content
    assert streamed[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_upstream_refusal_is_relayed_with_its_status(client: openai.OpenAI) -> None:
    too_long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=too_long, max_tokens=4)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=too_long, max_tokens=4, stream=True)
    assert caught.value.code == "context_length_exceeded"


def test_wrong_types_get_an_openai_shaped_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages="just a string")  # type: ignore[arg-type]
    assert caught.value.param == "messages"
    assert caught.value.body["type"] == "invalid_request_error"


def test_malformed_json_gets_an_openai_shaped_400(embedded_gateway: str, auth: dict) -> None:
    response = httpx.post(
        f"{embedded_gateway}/v1/chat/completions",
        content=b'{"model": "m", "messages": [',
        headers={**auth, "content-type": "application/json", "x-request-id": "client-chosen-id"},
    )
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "client-chosen-id"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "could not parse the JSON" in error["message"]


def test_oversized_body_gets_413(embedded_gateway: str, auth: dict) -> None:
    huge = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (11 * 1024 * 1024)}]})
    response = httpx.post(f"{embedded_gateway}/v1/chat/completions", content=huge, headers=auth, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unknown_route_is_an_openai_shaped_404(embedded_gateway: str, embedded_key: str) -> None:
    response = httpx.post(f"{embedded_gateway}/v1/nonsense", json={"input": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    # A route other upstreams serve, which the embedded model does not: a 404 that says so.
    relayed = httpx.post(f"{embedded_gateway}/v1/embeddings", json={"input": "x"}, headers={"x-api-key": embedded_key})
    assert relayed.status_code == 404
    assert "CCPROXY_UPSTREAM_URL" in relayed.json()["error"]["message"]
