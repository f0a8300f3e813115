"""Upstream usage in answers and streams, and the token figures built from it."""

from __future__ import annotations

import json

from ccproxy.serving import token_figures
from ccproxy.protocol import sse_event, sse_fields
from ccproxy.usage_tap import (
    UpstreamUsage,
    caller_asked_for_usage,
    tap_event,
    usage_of_body,
    with_usage_requested,
)

USAGE = {"prompt_tokens": 120, "completion_tokens": 7, "total_tokens": 127}


def chunk(choices: list, usage: dict | None = None) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return sse_event(body)


def test_usage_is_asked_for_without_losing_the_callers_options() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"other": 1}}
    asked = with_usage_requested(body)
    assert asked["stream_options"] == {"other": 1, "include_usage": True}
    assert body["stream_options"] == {"other": 1}  # the caller's body is not touched
    assert not caller_asked_for_usage(body) and caller_asked_for_usage(asked)


def test_a_usage_only_chunk_is_dropped_unless_the_caller_asked() -> None:
    event = chunk([], USAGE)
    assert tap_event(event, caller_asked=False) == (None, UpstreamUsage(120, 7))
    assert tap_event(event, caller_asked=True) == (event, UpstreamUsage(120, 7))


def test_usage_riding_on_a_choice_chunk_is_removed_from_it() -> None:
    choice = [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]
    relayed, usage = tap_event(chunk(choice, USAGE), caller_asked=False)
    assert usage == UpstreamUsage(120, 7)
    assert json.loads(sse_fields(relayed)["data"]) == {"id": "c1", "object": "chat.completion.chunk", "choices": choice}


def test_other_events_pass_unchanged() -> None:
    for event in (b"data: [DONE]\n\n", chunk([{"index": 0, "delta": {}}]), b": keep-alive\n\n", b"data: {oops\n\n"):
        assert tap_event(event, caller_asked=False) == (event, None)


def test_usage_of_a_whole_answer() -> None:
    assert usage_of_body(json.dumps({"usage": USAGE}).encode()) == UpstreamUsage(120, 7)
    assert usage_of_body(b"not json") is None
    assert usage_of_body(json.dumps({"usage": {"prompt_tokens": -1, "completion_tokens": True}}).encode()) == UpstreamUsage(None, None)


def test_upstream_prompt_tokens_are_the_truth_for_after_and_saved_is_ours() -> None:
    figures = token_figures(counted_before=1000, counted_after=400, upstream_prompt_tokens=401)
    assert (figures.before, figures.after, figures.saved) == (1001, 401, 600)
    assert figures.before - figures.after == figures.saved
    headers = token_figures(1000, 400, None).headers()
    assert headers == {"x-tokens-before": "1000", "x-tokens-after": "400", "x-tokens-saved": "600",
                       "x-compression-ratio": "0.4000"}
