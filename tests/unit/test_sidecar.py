"""Sidecar mode of /v1/compress (the contract of LiteLLM's headroom guardrail) and the store behind
/v1/retrieve/{id}, with a plain lexical scorer and a word counter (no model, no server)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import Any

import pytest

from ccproxy.auth import Principal
from ccproxy.compress_endpoint import (
    SIDECAR_QUERY,
    parse_compress_call,
    serve_compress,
    serve_retrieve,
    sidecar_view,
)
from ccproxy.compression.gateway import ContextCompressor, compress_response
from ccproxy.compression.pipeline import Compression
from ccproxy.limits import RateLimiter
from ccproxy.protocol import ProxyError
from ccproxy.retrieval import RetrievalStore
from ccproxy.serving import ChatParts
from ccproxy.settings import Settings
from tests.unit.test_pipeline import overlap_score

# What the guardrail accepts as an id (litellm/proxy/guardrails/guardrail_hooks/headroom/headroom.py).
HEADROOM_HASH = re.compile(r"[a-f0-9]{12,24}")
ALICE = Principal("acct-alice", "alice", "key-alice")
BOB = Principal("acct-bob", "bob", "key-bob")


class Words:
    """A token counter: one token per word; a prompt adds 3 per message."""

    name = "words"

    def __call__(self, texts: Sequence[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    def count_prompt(self, body: dict[str, Any]) -> int:
        messages = body.get("messages") or []
        return sum(len(json.dumps(m.get("content")).split()) + 3 for m in messages)


class Events:
    def __init__(self) -> None:
        self.recorded: list[Any] = []

    async def record(self, event: Any) -> None:
        self.recorded.append(event)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def documents(n: int = 12) -> str:
    docs = [f"Document {i}: " + " ".join(f"filler{i}x{j}" for j in range(40)) + "." for i in range(n)]
    docs[4] = "Document 4: the treaty of zurich was signed in 1859 by austria and france " + " ".join(["x"] * 30) + "."
    return "\n\n".join(docs)


def tool_log(n: int = 60) -> str:
    return "\n".join(f"2024-05-01 12:00:{i:02d} INFO worker {i} finished batch {i * 7} in {i % 9} ms" for i in range(n))


def guardrail_payload() -> list[dict[str, Any]]:
    """What the guardrail sends for [system, user docs, assistant, user question] plus an agent
    step: only the rows it lets a compressor touch (no system, no last user, no assistant)."""
    return [
        {"role": "user", "content": "Search results:\n\n" + documents()},
        {"role": "tool", "tool_call_id": "call_1", "content": tool_log()},
        {"role": "user", "content": [{"type": "text", "text": "short note"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
    ]


def run_compress(body: dict[str, Any], principal: Principal = ALICE, *, store: RetrievalStore | None = None,
                 settings: Settings | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> dict[str, Any]:
    settings = settings or Settings(compression_threshold_tokens=100)
    events = Events()
    parts = ChatParts(
        upstream=None,  # type: ignore[arg-type]
        compressor=ContextCompressor(overlap_score, settings),
        counter_for=lambda model: Words(),
        recorder=events,  # type: ignore[arg-type]
    )
    response = asyncio.run(serve_compress(parts, principal, json.dumps(body).encode(), "req_1", RateLimiter(0, 0)))
    answer = json.loads(response.body)
    answer["_events"] = events.recorded
    return answer


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> RetrievalStore:
    kept = RetrievalStore(ttl_s=300, max_entries=100, max_bytes=1 << 20)
    monkeypatch.setattr("ccproxy.compress_endpoint.shared_store", lambda: kept)
    return kept


def assert_guardrail_accepts(sent: list[dict[str, Any]], answer: dict[str, Any]) -> None:
    """The checks the headroom guardrail makes before it uses an answer (else it fails the call)."""
    returned = [m for m in answer["messages"] if isinstance(m, dict)]
    assert returned, "empty message list"
    assert len(returned) == len(sent), "changed the message count"
    assert [m.get("role") for m in returned] == [m.get("role") for m in sent]
    for key in ("tokens_before", "tokens_after", "tokens_saved", "compression_ratio"):
        assert isinstance(answer[key], (int, float)) and not isinstance(answer[key], bool)
    assert all(HEADROOM_HASH.fullmatch(h) for h in answer["ccr_hashes"])


# --- compress_response ----------------------------------------------------------------------------


def test_compress_response_has_the_ratio_after_over_before() -> None:
    body = compress_response(Compression([], "compressed", 200, 50, ()))
    assert (body["compression_ratio"], body["tokens_saved"], body["ccr_hashes"]) == (0.25, 150, [])
    assert compress_response(Compression([], "below_threshold", 0, 0, ()))["compression_ratio"] == 1.0


# --- sidecar mode -----------------------------------------------------------------------------------


def test_config_selects_sidecar_mode_and_unknown_config_knobs_are_accepted() -> None:
    _, asked = parse_compress_call(json.dumps({"messages": [{"role": "user", "content": "x"}], "config": {"mode": "ccr", "target_ratio": 0.3}}).encode())
    assert asked.config is not None and asked.config.mode == "ccr"
    _, plain = parse_compress_call(json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode())
    assert plain.config is None
    with pytest.raises(ProxyError) as refused:
        parse_compress_call(json.dumps({"messages": [{"role": "user", "content": "x"}], "config": "ccr"}).encode())
    assert refused.value.status == 400


def test_sidecar_view_puts_every_shortenable_row_before_a_stand_in_question() -> None:
    rows = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "docs"},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "tool_call_id": "c", "content": "result"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]
    view = sidecar_view(rows)
    assert [(m["role"], m.get("_ccproxy_row")) for m in view] == [("user", 1), ("user", 3), ("user", None)]
    assert view[-1]["content"] == SIDECAR_QUERY
    assert sidecar_view([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]) == []


def test_sidecar_answer_keeps_every_row_and_role_and_marks_what_it_dropped(store: RetrievalStore) -> None:
    sent = guardrail_payload()
    answer = run_compress({"messages": sent, "model": "m", "config": {"mode": "ccr"}, "ratio": 0.3})
    assert answer["outcome"] == "compressed"
    assert_guardrail_accepts(sent, answer)
    rows = answer["messages"]
    assert rows[1]["tool_call_id"] == "call_1"
    assert answer["tokens_after"] < answer["tokens_before"]
    assert answer["compression_ratio"] == round(answer["tokens_after"] / answer["tokens_before"], 4)
    assert answer["tokens_saved"] == answer["tokens_before"] - answer["tokens_after"]
    # Each shortened row ends with a marker naming its id; each id gives the row's original back.
    shortened = [i for i, row in enumerate(rows) if row["content"] != sent[i]["content"]]
    assert shortened and len(answer["ccr_hashes"]) == len(shortened)
    for i, ref in zip(shortened, answer["ccr_hashes"]):
        assert rows[i]["content"].endswith(f"Retrieve original: hash={ref}]")
        retrieved = json.loads(serve_retrieve(ALICE, ref, store).body)
        assert retrieved == {"object": "ccproxy.retrieval", "hash": ref, "original_content": sent[i]["content"]}
    # No unit of the stand-in question is reported; the usage event carries the figures.
    assert all(unit["kind"] != "query" for unit in answer["units"])
    (event,) = answer["_events"]
    assert (event.kind, event.tokens_before, event.tokens_after) == ("compress", answer["tokens_before"], answer["tokens_after"])


def test_sidecar_keeps_list_content_as_a_list_with_its_other_parts() -> None:
    sent = [{"role": "user", "content": [{"type": "text", "text": documents()}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    answer = run_compress({"messages": sent, "config": {}, "ratio": 0.2})
    (row,) = answer["messages"]
    assert answer["outcome"] == "compressed"
    assert [part["type"] for part in row["content"]] == ["text", "image_url", "text"]
    assert row["content"][-1]["text"].startswith("[ccproxy: ") and "hash=" not in row["content"][-1]["text"]
    assert answer["ccr_hashes"] == []  # no "ccr" mode: markers without ids, nothing kept


def test_sidecar_without_rows_to_shorten_hands_them_back() -> None:
    sent = [{"role": "assistant", "content": "I looked at it."}, {"role": "system", "content": "rules"}]
    answer = run_compress({"messages": sent, "config": {"mode": "ccr"}})
    assert answer["messages"] == sent and answer["outcome"] == "nothing_to_drop"
    assert answer["compression_ratio"] == 1.0 and answer["ccr_hashes"] == []


def test_sidecar_below_the_threshold_changes_nothing(store: RetrievalStore) -> None:
    sent = [{"role": "user", "content": "a short earlier question"}]
    answer = run_compress({"messages": sent, "config": {"mode": "ccr"}})
    assert answer["messages"] == sent and answer["outcome"] == "below_threshold"
    assert answer["tokens_before"] == answer["tokens_after"] == 4 and answer["ccr_hashes"] == []


def test_a_row_longer_than_the_store_takes_gets_a_marker_without_an_id(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = RetrievalStore(ttl_s=300, max_entries=100, max_bytes=100)
    monkeypatch.setattr("ccproxy.compress_endpoint.shared_store", lambda: tiny)
    answer = run_compress({"messages": [{"role": "user", "content": documents()}], "config": {"mode": "ccr"}})
    assert answer["outcome"] == "compressed" and answer["ccr_hashes"] == []
    assert "hash=" not in answer["messages"][0]["content"]


def test_plain_mode_is_unchanged_but_for_the_two_new_fields() -> None:
    sent = [{"role": "system", "content": "Answer from the documents."},
            {"role": "user", "content": documents() + "\n\nQuestion: when was the treaty of zurich signed?"}]
    answer = run_compress({"messages": sent, "ratio": 0.3})
    assert answer["outcome"] == "compressed" and answer["ccr_hashes"] == []
    assert "[ccproxy:" not in answer["messages"][1]["content"]
    assert sum(u["tokens"] for u in answer["units"] if u["kept"]) == answer["tokens_after"]


# --- /v1/retrieve/{id} and the store ----------------------------------------------------------------


def test_retrieve_is_scoped_to_the_account_and_404s_alike_for_unknown_and_foreign_ids() -> None:
    kept = RetrievalStore(ttl_s=300, max_entries=10, max_bytes=1000)
    ref = kept.put(ALICE.account_id, "the original")
    assert ref is not None and HEADROOM_HASH.fullmatch(ref) and len(ref) == 24
    assert json.loads(serve_retrieve(ALICE, ref, kept).body)["original_content"] == "the original"
    messages = []
    for principal, asked in ((BOB, ref), (ALICE, "0" * 24), (ALICE, "not-an-id"), (ALICE, ref.upper())):
        with pytest.raises(ProxyError) as missing:
            serve_retrieve(principal, asked, kept)
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        assert asked not in missing.value.message
        messages.append(missing.value.message)
    assert len(set(messages)) == 1  # another account's id reads exactly as an unknown one


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    kept = RetrievalStore(ttl_s=300, max_entries=10, max_bytes=1000, clock=clock)
    ref = kept.put("a", "text")
    clock.now += 299.9
    assert kept.get("a", ref) == "text"
    clock.now += 0.1
    assert kept.get("a", ref) is None
    assert kept.stats() == (0, 0)


def test_each_account_is_bounded_by_entries_and_bytes_oldest_first() -> None:
    kept = RetrievalStore(ttl_s=300, max_entries=3, max_bytes=10)
    refs = [kept.put("a", "xy") for _ in range(4)]
    assert [kept.get("a", ref) for ref in refs] == [None, "xy", "xy", "xy"]  # 3 entries at most
    big = kept.put("a", "12345678")  # 8 bytes: only one "xy" may stay beside it
    assert [kept.get("a", ref) for ref in refs[1:]] == [None, None, "xy"] and kept.get("a", big) == "12345678"
    assert kept.put("a", "x" * 11) is None  # over the bound alone: refused, nothing evicted
    assert kept.get("a", big) == "12345678"
    other = kept.put("b", "é" * 5)  # 10 bytes in UTF-8: the other account's room is its own
    assert kept.get("b", other) == "é" * 5 and kept.get("a", big) == "12345678"
    assert kept.stats() == (3, 2 + 8 + 10)


def test_expired_accounts_are_swept_as_others_keep_storing() -> None:
    clock = Clock()
    kept = RetrievalStore(ttl_s=1, max_entries=10_000, max_bytes=1 << 20, clock=clock)
    kept.put("gone", "text")
    clock.now += 5
    for _ in range(256):
        kept.put("busy", "t")
    assert kept.stats() == (256, 256)


def test_ids_are_random() -> None:
    kept = RetrievalStore(ttl_s=300, max_entries=1000, max_bytes=1 << 20)
    refs = {kept.put("a", "same text") for _ in range(200)}
    assert len(refs) == 200


def test_sidecar_answers_odd_rows_without_failing(store: RetrievalStore) -> None:
    sent = [
        {"role": "user", "content": None},
        {"role": "user", "content": ""},
        {"role": "function", "name": "f", "content": documents()},
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": 5}, {"type": "text", "text": tool_log()}]},
        {"role": "developer", "content": documents()},
        {"role": "critic", "content": documents()},
    ]
    answer = run_compress({"messages": sent, "config": {"mode": "ccr"}, "budget": 50})
    assert_guardrail_accepts(sent, answer)
    assert answer["messages"][0] == sent[0] and answer["messages"][1] == sent[1]
    assert answer["messages"][4:] == sent[4:]  # neither a system-like nor an unknown role is shortened
    assert answer["messages"][3]["content"][0] == {"type": "text", "text": 5}


def test_all_accounts_together_stay_under_the_total_bound() -> None:
    """Many accounts, each under its own bound: the oldest entries go, whoever put them."""
    kept = RetrievalStore(ttl_s=300, max_entries=100, max_bytes=100, max_total_bytes=250)
    refs = [(f"acct_{n}", kept.put(f"acct_{n}", "x" * 50)) for n in range(10)]
    assert kept.stats() == (5, 250)
    assert [kept.get(account, ref) is not None for account, ref in refs] == [False] * 5 + [True] * 5
