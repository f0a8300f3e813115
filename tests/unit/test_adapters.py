"""The Responses and Messages adapters: what becomes a unit, what is protected, and that a
compressed request is still valid for its API (calls and results together, nothing pinned
changed)."""

from __future__ import annotations

import asyncio
import copy
import json

from ccproxy.adapters import messages as messages_wire
from ccproxy.adapters import responses as responses_wire
from ccproxy.compression.history import HistoryMemo
from ccproxy.compression.pipeline import compress_wire
from ccproxy.compression.units import edits, segment
from tests.unit.test_pipeline import overlap_score, plan, words

FILLER = " ".join(f"filler{j}" for j in range(60))


def _documents(topic: str, n: int = 6) -> str:
    documents = [f"Document {i}: {FILLER} x{i}" for i in range(n)]
    documents[2] = f"Document 2: the {topic} treaty was signed in 1859. {FILLER}"
    return "\n\n".join(documents)


def _run(wire, body, **options):
    return asyncio.run(compress_wire(wire, body, plan(**options), count_tokens=words, score=overlap_score))


# --- Responses ---------------------------------------------------------------------------------


def _responses_body() -> dict:
    lookup = {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q": "zurich"}'}
    other = {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city": "oslo"}'}
    return {
        "model": "m",
        "instructions": "Answer from the documents.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": _documents("zurich")}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Searching."}]},
            lookup,
            {"type": "function_call_output", "call_id": "c1", "output": "zurich treaty 1859 " + FILLER},
            other,
            {"type": "function_call_output", "call_id": "c2", "output": "oslo rain " + FILLER},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Found it."}]},
            {"role": "user", "content": "When was the zurich treaty signed?"},
        ],
    }


def test_a_responses_call_and_its_output_are_one_unit_and_the_question_is_kept() -> None:
    body = _responses_body()
    conversation = responses_wire.parse(body)
    seg = segment(conversation.turns)
    exchanges = [u for u in seg.units if u.kind == "tool_exchange"]
    assert len(exchanges) == 2
    assert "lookup(" in exchanges[0].text and "zurich treaty 1859" in exchanges[0].text
    assert seg.query == "When was the zurich treaty signed?"
    result = _run(responses_wire.FORMAT, body, ratio=0.3, threshold_tokens=0)
    assert result.outcome == "compressed" and result.tokens_after < result.tokens_before
    items = result.forwarded["input"]
    ids = [i.get("call_id") for i in items if i.get("type") in ("function_call", "function_call_output")]
    assert all(ids.count(x) == 2 for x in set(ids))  # each call with its output
    assert "c2" not in ids  # the oslo exchange is irrelevant to the question and dropped
    assert items[-1] == body["input"][-1]
    assert result.forwarded["instructions"] == body["instructions"]
    assert result.forwarded["model"] == "m" and body == _responses_body()  # the input is not modified


def test_responses_reasoning_pins_what_follows_it_and_unknown_items_travel_untouched() -> None:
    body = _responses_body()
    body["input"][1:1] = [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"}]
    body["input"].insert(0, {"type": "item_reference", "id": "msg_9"})
    result = _run(responses_wire.FORMAT, body, ratio=0.05, threshold_tokens=0)
    items = result.forwarded["input"]
    assert items[0] == {"type": "item_reference", "id": "msg_9"}
    # The reasoning item and the output items after it, up to the next tool output, stay as sent.
    start = items.index(body["input"][2])
    assert items[start : start + 4] == body["input"][2:6]


def test_a_responses_string_input_and_a_rebuild_that_keeps_everything() -> None:
    body = {"model": "m", "input": _documents("oslo") + "\n\nWhen was the oslo treaty signed?"}
    result = _run(responses_wire.FORMAT, body, ratio=0.3, threshold_tokens=0)
    assert isinstance(result.forwarded["input"], str)
    assert "oslo treaty was signed in 1859" in result.forwarded["input"]
    assert result.forwarded["input"].endswith("When was the oslo treaty signed?")
    conversation = responses_wire.parse(_responses_body())
    seg = segment(conversation.turns)
    assert responses_wire.render(_responses_body(), edits(seg, [True] * len(seg.units))) == _responses_body()


# --- Messages ----------------------------------------------------------------------------------


def _messages_body() -> dict:
    return {
        "model": "claude",
        "max_tokens": 64,
        "system": "Answer from the documents.",
        "messages": [
            {"role": "user", "content": _documents("zurich")},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": "zurich"}},
                {"type": "tool_use", "id": "t2", "name": "weather", "input": {"city": "oslo"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "zurich treaty 1859 " + FILLER},
                {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "oslo rain " + FILLER}]},
                {"type": "text", "text": "Thanks. Also, unrelated: " + FILLER},
            ]},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "When was the zurich treaty signed?"},
        ],
    }


def _tool_ids(messages: list[dict]) -> tuple[list[str], list[str]]:
    uses, results = [], []
    for message in messages:
        for block in message["content"] if isinstance(message["content"], list) else []:
            if block["type"] == "tool_use":
                uses.append(block["id"])
            if block["type"] == "tool_result":
                results.append(block["tool_use_id"])
    return uses, results


def test_tool_results_are_turns_of_their_own_and_go_with_their_call() -> None:
    conversation = messages_wire.parse(_messages_body())
    roles = [turn.role for turn in conversation.turns]
    assert roles == ["system", "user", "assistant", "tool", "tool", "user", "assistant", "user"]
    seg = segment(conversation.turns)
    assert [u.kind for u in seg.units].count("tool_exchange") == 1  # one call message, both results
    result = _run(messages_wire.FORMAT, _messages_body(), ratio=0.2, threshold_tokens=0)
    assert result.outcome == "compressed"
    uses, results = _tool_ids(result.forwarded["messages"])
    assert uses == results  # every result follows its call, no orphan either way
    assert result.forwarded["messages"][-1] == _messages_body()["messages"][-1]
    assert all(m["content"] for m in result.forwarded["messages"])  # no empty message is sent


def test_nothing_at_or_before_the_last_cache_breakpoint_changes() -> None:
    body = _messages_body()
    body["messages"][2]["content"][0]["cache_control"] = {"type": "ephemeral"}
    pinned = messages_wire.parse(body).turns
    assert [turn.pinned for turn in pinned][:4] == [True, True, True, True]
    assert not pinned[4].pinned and not pinned[5].pinned
    result = _run(messages_wire.FORMAT, copy.deepcopy(body), ratio=0.05, threshold_tokens=0)
    forwarded = result.forwarded["messages"]
    assert forwarded[:2] == body["messages"][:2]
    assert forwarded[2]["content"][0] == body["messages"][2]["content"][0]
    # Compressing the same request again forwards the same prefix, byte for byte.
    again = _run(messages_wire.FORMAT, copy.deepcopy(body), ratio=0.05, threshold_tokens=0)
    assert json.dumps(again.forwarded) == json.dumps(result.forwarded)


def test_a_message_with_thinking_is_kept_or_dropped_whole_never_shortened() -> None:
    body = _messages_body()
    thought = {"type": "thinking", "thinking": "Weighing the documents. " + FILLER, "signature": "sig=="}
    body["messages"][3] = {"role": "assistant", "content": [thought, {"type": "text", "text": "Noted. " + FILLER}]}
    turn = messages_wire.parse(body).turns[6]
    assert turn.atomic and turn.parts[0] is None
    for ratio in (0.05, 0.5, 0.9):
        forwarded = _run(messages_wire.FORMAT, copy.deepcopy(body), ratio=ratio, threshold_tokens=0).forwarded
        kept = [m for m in forwarded["messages"] if m["role"] == "assistant" and isinstance(m["content"], list)
                and m["content"][0].get("type") == "thinking"]
        assert kept in ([], [body["messages"][3]])


def test_messages_history_is_append_only_across_requests() -> None:
    body = _messages_body()
    memo = HistoryMemo()
    first = asyncio.run(compress_wire(messages_wire.FORMAT, body, plan(ratio=0.3, threshold_tokens=0),
                                      count_tokens=words, score=overlap_score, memo=memo))
    later = copy.deepcopy(body)
    later["messages"] += [{"role": "assistant", "content": "1859."},
                          {"role": "user", "content": "And what about oslo weather?"}]
    second = asyncio.run(compress_wire(messages_wire.FORMAT, later, plan(ratio=0.3, threshold_tokens=0),
                                       count_tokens=words, score=overlap_score, memo=memo))
    sent_before = first.forwarded["messages"]
    assert second.forwarded["messages"][: len(sent_before)] == sent_before
    assert memo.hits >= 1
