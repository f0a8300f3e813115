"""Small guards on the request path: identifiers that reach the database and logs, the tally
of a stream's completion for billing a stream cut short, and the token bucket's refund."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from ccproxy.completion_tally import CompletionTally
from ccproxy.identifiers import MAX_MODEL_CHARS, unsafe_reason
from ccproxy.limits import Bucket, credit
from ccproxy.protocol import ProxyError, parse_chat_request, sse_event
from ccproxy.usage_tap import chunk_of


def words(texts: Sequence[str]) -> list[int]:
    return [len(text.split()) for text in texts]


@pytest.mark.parametrize("value", ["gpt-4o", "ft:gpt-4o-mini:acme::abc123", "smollm2-upstream", "模型"])
def test_ordinary_model_names_are_safe(value: str) -> None:
    assert unsafe_reason(value, MAX_MODEL_CHARS) is None


@pytest.mark.parametrize("value", ["a\u0000b", "a\nb", "tab\there", "del\u007f", "c1\u0085", "x" * (MAX_MODEL_CHARS + 1)])
def test_control_characters_and_long_names_are_refused(value: str) -> None:
    assert unsafe_reason(value, MAX_MODEL_CHARS) is not None


@pytest.mark.parametrize("field", ["model", "user"])
def test_a_hostile_identifier_is_a_400_that_does_not_quote_it(field: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: "secret-value\u0000"}
    with pytest.raises(ProxyError) as refused:
        parse_chat_request(json.dumps(body).encode())
    assert refused.value.status == 400 and refused.value.param == field
    assert "secret-value" not in refused.value.message


def test_a_long_message_list_is_checked_past_the_first_slice() -> None:
    messages: list[object] = [{"role": "user", "content": "hi"}] * 2500
    messages[2345] = {"role": "user", "content": 5}
    with pytest.raises(ProxyError) as refused:
        parse_chat_request(json.dumps({"model": "m", "messages": messages}).encode())
    assert refused.value.param == "messages[2345].content"


def _chunk(delta: dict[str, object]) -> bytes:
    return sse_event({"choices": [{"index": 0, "delta": delta}]})


def test_the_tally_counts_content_refusals_and_tool_arguments() -> None:
    tally = CompletionTally()
    tally.feed(chunk_of(_chunk({"role": "assistant", "content": "Hello there"})))
    tally.feed(chunk_of(_chunk({"tool_calls": [{"index": 0, "function": {"name": "search", "arguments": '{"q": "x"}'}}]})))
    tally.feed(chunk_of(_chunk({"refusal": "no more"})))
    tally.feed(chunk_of(b"data: {not json\n\n"))
    tally.feed(chunk_of(b"data: [DONE]\n\n"))
    # One text, counted once: the pieces as the model generated them, end to end.
    assert tally.tokens(words) == len('Hello theresearch{"q": "x"}no more'.split())


def test_the_tally_holds_a_bounded_amount_and_estimates_the_rest() -> None:
    tally = CompletionTally(max_chars=10)
    tally.feed(chunk_of(_chunk({"content": "a b c d e " * 5})))  # 50 characters: 10 held, 40 estimated
    assert tally.tokens(words) == len("a b c d e ".split()) + 40 // 4


def test_a_refund_never_fills_a_bucket_past_its_capacity() -> None:
    bucket = Bucket(level=10.0, at=0.0)
    assert credit(bucket, 50.0, capacity=100.0, per_second=0.0, now=0.0).level == 60.0
    assert credit(bucket, 500.0, capacity=100.0, per_second=0.0, now=0.0).level == 100.0


def test_integers_beyond_64_bits_are_forwarded_exactly() -> None:
    from ccproxy.protocol import dumps_bytes, parse_json_object

    body = parse_json_object(b'{"seed": 18446744073709551616, "n": 2, "t": 0.5}')
    assert body["seed"] == 18446744073709551616  # orjson alone would read 1.8446744073709552e+19
    assert b'"seed":18446744073709551616' in dumps_bytes(body)


@pytest.mark.parametrize("number", [b"NaN", b"-Infinity", b"1e999", b"9" * 5000])
def test_numbers_json_cannot_hold_are_a_400(number: bytes) -> None:
    with pytest.raises(ProxyError) as refused:
        parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": ' + number + b"}")
    assert refused.value.status == 400
