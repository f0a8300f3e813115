"""The retrieve loop's own rules, over a scripted ``send`` (the upstream): rounds end at the
limit with ccproxy's calls removed, every round's text and usage reach the client, an id
that is not held is a tool error, and a streamed answer is spliced into one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from ccproxy.lossless.chat import ChatDialect
from ccproxy.lossless.loop import MISSING, RetrieveRounds, Retriever
from ccproxy.lossless.messages import MessagesDialect
from ccproxy.retrieval import RetrievalStore
from ccproxy.upstream import UpstreamReply
from ccproxy.usage_tap import chunk_of


def _store_with(text: str) -> tuple[RetrievalStore, str]:
    store = RetrievalStore(ttl_s=300, max_entries=100, max_bytes=1 << 20)
    return store, store.keep("acct", text) or ""


def _chat_answer(text: str, calls: list[tuple[str, str]], prompt: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": "ccproxy_retrieve", "arguments": json.dumps({"id": ref})}}
            for cid, ref in calls
        ]
    return {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 2}}


def test_rounds_end_at_the_limit_and_the_client_never_sees_the_tool() -> None:
    store, ref = _store_with("the original")
    bodies: list[dict[str, Any]] = []

    async def send(body: dict[str, Any], stream: bool) -> UpstreamReply:
        bodies.append(body)
        answer = _chat_answer(f"step {len(bodies)}. ", [(f"c{len(bodies)}", ref)], prompt=100 * len(bodies))
        return UpstreamReply(200, {}, body=json.dumps(answer).encode())

    done = RetrieveRounds()
    retriever = Retriever(ChatDialect(), store, "acct", 2, done)
    reply = asyncio.run(retriever.answered(send, {"model": "m", "messages": [{"role": "user", "content": "q"}]}))
    answer = json.loads(reply.body)
    message = answer["choices"][0]["message"]
    assert len(bodies) == 3 and done.rounds == 2 and done.calls == 2
    assert "tool_calls" not in message and answer["choices"][0]["finish_reason"] == "stop"
    assert message["content"] == "step 1. step 2. step 3. "  # every round's text, in order
    assert answer["usage"] == {"prompt_tokens": 600, "completion_tokens": 6}
    assert done.extra_prompt_tokens == 500  # the rounds after the first
    # The continuation carries the call and its result, the original text, uncompressed.
    assert bodies[1]["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": "the original"}
    assert bodies[1]["messages"][-2]["tool_calls"][0]["id"] == "c1"


def test_an_id_not_held_is_a_tool_error_for_the_model() -> None:
    store, _ = _store_with("kept")
    retriever = Retriever(ChatDialect(), store, "acct", 3, RetrieveRounds())
    from ccproxy.lossless.loop import Call

    assert retriever.result(Call("c", "ccproxy_retrieve", json.dumps({"id": "0" * 24}))) == MISSING
    assert retriever.result(Call("c", "ccproxy_retrieve", "not json")).startswith("ccproxy_retrieve error")
    assert Retriever(ChatDialect(), store, "other-account", 3, RetrieveRounds()).result(
        Call("c", "ccproxy_retrieve", json.dumps({"id": store.keep("acct", "kept")}))
    ) == MISSING  # another account's id is not held for this one
    assert retriever.done.missing == 2


def _events(*payloads: dict[str, Any]) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for payload in payloads:
            yield f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()

    return gen()


def test_a_streamed_messages_answer_is_spliced_into_one() -> None:
    store, ref = _store_with("FACT-1 is here")
    first = _events(
        {"type": "message_start", "message": {"id": "m1", "usage": {"input_tokens": 100, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Looking. "}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t1", "name": "ccproxy_retrieve", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": json.dumps({"id": ref})}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}},
        {"type": "message_stop"},
    )
    sent: list[dict[str, Any]] = []

    async def send(body: dict[str, Any], stream: bool) -> UpstreamReply:
        sent.append(body)
        return UpstreamReply(200, {}, events=_events(
            {"type": "message_start", "message": {"id": "m2", "usage": {"input_tokens": 150, "output_tokens": 1}}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "FACT-1."}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
            {"type": "message_stop"},
        ))

    retriever = Retriever(MessagesDialect(), store, "acct", 3, RetrieveRounds())
    body = {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "q"}]}

    async def collect() -> list[Any]:
        return [chunk_of(event) async for event in retriever.spliced(send, body, first)]

    out = asyncio.run(collect())
    kinds = [e["type"] for e in out]
    assert kinds.count("message_start") == 1 and kinds[-1] == "message_stop" and kinds.count("message_delta") == 1
    assert all(e.get("content_block", {}).get("type") != "tool_use" for e in out)  # ours never shown
    assert [e["index"] for e in out if e["type"] == "content_block_start"] == [0, 1]  # renumbered
    text = "".join(e["delta"]["text"] for e in out if e["type"] == "content_block_delta")
    assert text == "Looking. FACT-1."
    final = next(e for e in out if e["type"] == "message_delta")
    assert final["delta"]["stop_reason"] == "end_turn"
    assert final["usage"]["input_tokens"] == 250 and final["usage"]["output_tokens"] == 10
    # The continuation: the first round's blocks (the call's input rebuilt), then the result.
    assert sent[0]["messages"][1]["content"][1] == {"type": "tool_use", "id": "t1", "name": "ccproxy_retrieve", "input": {"id": ref}}
    assert sent[0]["messages"][2]["content"][0]["content"] == "FACT-1 is here"
