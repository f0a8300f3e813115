"""Property: whatever the compressor keeps of a generated agent trace is still a valid request for
its API — every tool result follows the call that asked for it, in the same order, with nothing
orphaned either way; no message is left empty; the newest step and the task arrive whole."""

from __future__ import annotations

import asyncio
import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from ccproxy.adapters import chat as chat_wire
from ccproxy.adapters import messages as messages_wire
from ccproxy.adapters import responses as responses_wire
from ccproxy.compression.history import HistoryMemo
from ccproxy.compression.pipeline import compress_wire
from ccproxy.lossless.markers import Marking
from ccproxy.retrieval import RetrievalStore
from tests.unit.test_pipeline import overlap_score, plan, words

WORDS = ["zurich", "treaty", "parser", "noise", "log", "error", "file", "line", "date", "value"]
text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
long_text = st.lists(text, min_size=1, max_size=40).map("\n".join)
# A step: how many calls, whether each output is long, and an optional assistant remark.
step = st.tuples(st.integers(1, 3), st.lists(st.booleans(), min_size=3, max_size=3), st.booleans())
trace = st.tuples(
    st.lists(st.tuples(text, text), max_size=3),  # earlier user/assistant turns
    text,  # the task
    st.lists(step, min_size=1, max_size=5),
    st.lists(long_text, min_size=15, max_size=15),  # outputs to draw from
)
# (ratio, agent steps' min chars, keep the newest step whole, what a dropped stretch becomes)
compression = st.tuples(
    st.sampled_from([0.05, 0.3, 0.7]), st.sampled_from([None, 50]), st.booleans(), st.sampled_from(["lossy", "lossless"])
)


def _plan(ratio: float, min_chars: int | None, keep_newest: bool, mode: str):
    return plan(ratio=ratio, threshold_tokens=0, tool_result_min_chars=min_chars, keep_newest_tool_result=keep_newest)


def _run(wire, payload, options):
    # Lossless markers keep turns a lossy cut would drop: the pairing rules must hold either way.
    marking = Marking(options[3], "acct", RetrievalStore(ttl_s=60, max_entries=10_000, max_bytes=1 << 24))
    return asyncio.run(compress_wire(
        wire, copy.deepcopy(payload), _plan(*options), count_tokens=words, score=overlap_score, memo=HistoryMemo(),
        elide=marking,
    )).forwarded


def _output(outputs: list[str], n: int, long: bool) -> str:
    return outputs[n % len(outputs)] if long else "ok"


def _chat(history, task, steps, outputs) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": "Agent."}]
    for user, reply in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": task})
    n = 0
    for calls, longs, remark in steps:
        ids = [f"c{n + j}" for j in range(calls)]
        messages.append({"role": "assistant", "content": "Looking." if remark else None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "grep", "arguments": "{}"}} for i in ids]})
        for j, call_id in enumerate(ids):
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _output(outputs, n + j, longs[j])})
        n += calls
    return messages


def _chat_pairs_valid(messages: list[dict]) -> None:
    pending: list[str] = []
    for message in messages:
        if message["role"] == "tool":
            assert pending and pending.pop(0) == message["tool_call_id"]
        else:
            assert not pending, "a call lost its result"
            pending = [call["id"] for call in message.get("tool_calls") or []]
        assert message.get("content") != "" or message.get("tool_calls")
    assert not pending


@settings(max_examples=60, deadline=None, database=None)
@given(trace, compression)
def test_chat_traces_stay_valid(generated, options) -> None:
    messages = _chat(*generated)
    forwarded = _run(chat_wire.FORMAT, messages, options)
    _chat_pairs_valid(forwarded)
    task_at = max(i for i, m in enumerate(messages) if m["role"] == "user")
    assert messages[task_at] in forwarded  # the task arrives whole
    if options[2]:  # the newest step arrives whole
        newest = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        assert forwarded[-(len(messages) - newest):] == messages[newest:]


@settings(max_examples=60, deadline=None, database=None)
@given(trace, compression)
def test_responses_traces_stay_valid(generated, options) -> None:
    items: list[dict] = []
    for message in _chat(*generated)[1:]:
        if message["role"] == "tool":
            items.append({"type": "function_call_output", "call_id": message["tool_call_id"], "output": message["content"]})
        elif message.get("tool_calls"):
            if message["content"]:
                items.append({"type": "message", "role": "assistant", "content": message["content"]})
            items += [{"type": "function_call", "call_id": c["id"], "name": "grep", "arguments": "{}"} for c in message["tool_calls"]]
        else:
            items.append({"role": message["role"], "content": message["content"]})
    forwarded = _run(responses_wire.FORMAT, {"model": "m", "instructions": "Agent.", "input": items}, options)["input"]
    calls = [i["call_id"] for i in forwarded if i.get("type") == "function_call"]
    outputs = [i["call_id"] for i in forwarded if i.get("type") == "function_call_output"]
    assert sorted(calls) == sorted(outputs)  # no call without its output, no output without its call
    for item in forwarded:
        if item.get("type") == "function_call_output":
            call_at = next(k for k, other in enumerate(forwarded) if other.get("call_id") == item["call_id"])
            assert call_at < forwarded.index(item)


@settings(max_examples=60, deadline=None, database=None)
@given(trace, compression)
def test_messages_traces_stay_valid(generated, options) -> None:
    messages: list[dict] = []
    for message in _chat(*generated)[1:]:
        if message["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": message["content"]}
            if messages[-1]["role"] == "user" and isinstance(messages[-1]["content"], list):
                messages[-1]["content"].append(block)
            else:
                messages.append({"role": "user", "content": [block]})
        elif message.get("tool_calls"):
            blocks = [{"type": "text", "text": message["content"]}] if message["content"] else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": "grep", "input": {}} for c in message["tool_calls"]]
            messages.append({"role": "assistant", "content": blocks})
        else:
            messages.append({"role": message["role"], "content": message["content"]})
    body = {"model": "claude", "max_tokens": 8, "system": "Agent.", "messages": messages}
    forwarded = _run(messages_wire.FORMAT, body, options)["messages"]
    uses: list[str] = []
    for message in forwarded:
        assert message["content"], "an empty message"
        blocks = message["content"] if isinstance(message["content"], list) else []
        results = [b["tool_use_id"] for b in blocks if b["type"] == "tool_result"]
        assert results == uses, "the message after calls carries exactly their results, others none"
        uses = [b["id"] for b in blocks if b["type"] == "tool_use"]
    assert not uses
    assert forwarded[-1] == messages[-1] or not options[2]
