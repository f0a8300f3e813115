"""Request validation, error shapes and SSE framing, without a model or a socket."""

from __future__ import annotations

import asyncio
import json

import pytest

from ccproxy.protocol import (
    SSE_DONE,
    ProxyError,
    SSEDecoder,
    parse_chat_request,
    split_sse,
    sse_event,
    sse_fields,
)


def _raw(body: object) -> bytes:
    return json.dumps(body).encode()


def _refusal(raw: bytes) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        parse_chat_request(raw)
    assert caught.value.status == 400
    body = caught.value.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    return caught.value


def test_valid_request_is_returned_untouched_with_unknown_fields() -> None:
    sent = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "seed": 7,
        "a_future_field": {"nested": [1, 2.5, None]},
    }
    body, request = parse_chat_request(_raw(sent))
    assert body == sent
    assert request.model == "gpt-4o"
    assert request.stream is False


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "could not parse the JSON"),
        (b"", "could not parse the JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_undecodable_bodies_are_refused(raw: bytes, fragment: str) -> None:
    assert fragment in _refusal(raw).message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hello"}, "messages"),
        ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ],
)
def test_wrong_shapes_name_the_offending_param(body: dict, param: str) -> None:
    error = _refusal(_raw(body))
    assert error.param == param
    assert param in error.message


def test_sse_decoder_rejoins_events_split_anywhere() -> None:
    stream = sse_event({"a": 1}) + sse_event({"b": "é"}) + SSE_DONE
    for cut in range(1, len(stream)):
        decoder = SSEDecoder()
        events = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) + decoder.flush()
        assert b"".join(events) == stream
        assert len(events) == 3


def test_sse_decoder_normalises_crlf_and_flushes_an_unterminated_tail() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\r\n\r\ndata: 2") == [b"data: 1\n\n"]
    assert decoder.flush() == [b"data: 2\n\n"]
    assert decoder.flush() == []


def test_split_sse_over_async_chunks() -> None:
    async def chunks():
        for piece in (b"data: {\"x\"", b": 1}\n", b"\nda", b"ta: [DONE]\n\n"):
            yield piece

    async def collect() -> list[bytes]:
        return [event async for event in split_sse(chunks())]

    assert asyncio.run(collect()) == [b'data: {"x": 1}\n\n', SSE_DONE]


def test_sse_fields_reads_named_events_and_multiline_data() -> None:
    fields = sse_fields(b"event: status\ndata: line1\ndata: line2\n: a comment\n\n")
    assert fields == {"event": "status", "data": "line1\nline2"}


def test_sse_event_is_ascii_so_byte_chunking_cannot_split_a_character() -> None:
    assert sse_event({"text": "naïve 日本"}).isascii()
