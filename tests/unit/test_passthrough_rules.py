"""Which routes are relayed, and the usage event of a relayed answer (pure)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from ccproxy.auth import Principal
from ccproxy.passthrough import route_of, usage_event

PRINCIPAL = Principal("acct_1", "acme", "key1")
NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("embeddings", "embeddings"),
        ("files/file-abc123/content", "files"),
        ("vector_stores/vs_1/files", "vector_stores"),
        ("models/gpt-4o", "models"),
        ("chat/completions/chatcmpl-1/messages", "chat"),
        ("fine_tuning/jobs/ftjob-1:cancel", "fine_tuning"),
        ("nonsense", None),
        ("files/../chat/completions", None),
        ("files/./x", None),
        ("files//x", None),
        ("files/a b", None),
        ("files/.hidden", None),
        ("", None),
        ("embeddings/" + "x" * 600, None),
    ],
)
def test_routes(path: str, route: str | None) -> None:
    assert route_of(path) == route


def test_usage_of_chat_style_and_responses_style_answers() -> None:
    chat_style = json.dumps({"usage": {"prompt_tokens": 12, "completion_tokens": 3}}).encode()
    event = usage_event(PRINCIPAL, "completions", "m", chat_style, 5.0, NOW)
    assert event is not None
    assert (event.kind, event.tokens_after, event.prompt_tokens, event.completion_tokens) == ("completions", 12, 12, 3)
    responses = json.dumps({"usage": {"input_tokens": 20, "output_tokens": 4}}).encode()
    event = usage_event(PRINCIPAL, "responses", "m", responses, 5.0, NOW)
    assert event is not None and (event.tokens_after, event.completion_tokens) == (20, 4)


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"usage": 5}', b'{"usage": {"prompt_tokens": -1}}', b"{}"])
def test_no_event_without_a_sane_usage(body: bytes) -> None:
    assert usage_event(PRINCIPAL, "files", "m", body, 1.0, NOW) is None
