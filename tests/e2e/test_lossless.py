"""Lossless mode end to end: a real Gateway (and the real remote Compressor) in front of a
scripted model (``tests/e2e/retrieve_upstream.py``) that calls ``ccproxy_retrieve`` on cue, through
the official ``openai`` and ``anthropic`` clients, whole and streamed, on all three APIs.

What is checked: the Gateway offers its tool only in lossless mode, answers the model's calls
itself from the dropped originals and continues the conversation, so the client gets the
model's final answer and never sees the tool; a call for an id that is not held gives the
model a clear tool error (and the client a 200); a call beside the client's own tool leaves
the client its own call only; the usage the client sees is every round's, and the usage event
agrees; citation mode's marker names an id that ``GET /v1/retrieve/{id}`` answers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from harness.servers import create_key, free_port, running
from nqdata.items import Item
from tests.e2e.conftest import _gateway_to
from tests.e2e.usage_db import account_events

pytestmark = pytest.mark.e2e

ACCOUNT = "lossless-tests"
FACT = "FACT-40417"
LOSSLESS = {"x-compression-mode": "lossless", "x-compression-ratio": "0.2"}
WEATHER_TOOL_CHAT = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
WEATHER_TOOL_RESPONSES = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
WEATHER_TOOL_MESSAGES = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def scripted_upstream(logs_dir: Path) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "tests.e2e.retrieve_upstream", "--port", str(port)]
    with running(command, probe_url=f"{base}/models", log=logs_dir / "retrieve-upstream.log"):
        yield base


@pytest.fixture(scope="module")
def gateway(scripted_upstream: str, remote_compressor: str, database_url: str, logs_dir: Path) -> Iterator[str]:
    yield from _gateway_to(
        scripted_upstream, remote_compressor, database_url, logs_dir, "lossless",
        CCPROXY_UPSTREAM_API_KEY="sk-scripted",
        CCPROXY_ANTHROPIC_UPSTREAM_URL=scripted_upstream,
        CCPROXY_ANTHROPIC_UPSTREAM_API_KEY="sk-scripted",
        CCPROXY_COMPRESSION_THRESHOLD_TOKENS="200",
        # Scoring speed is not what these tests are about: on two busy cores it can pass 30 s.
        CCPROXY_COMPRESSOR_TIMEOUT_S="300",
    )


@pytest.fixture(scope="module")
def key(database_url: str) -> str:
    return create_key({"CCPROXY_DATABASE_URL": database_url}, ACCOUNT)


@pytest.fixture(scope="module")
def context(rag_item: Item) -> tuple[str, str]:
    """(documents, question): the fact is a sentence of a distractor document the question is
    not about, which compression at a fifth drops (checked: tests assert the model found it in a
    ccproxy_retrieve result, which only holds dropped text)."""
    documents = rag_item.messages()[-1]["content"]
    cut = documents.rfind("Question:")
    # Six documents (~1 k tokens): enough to compress, quick to score on two cores.
    docs, question = documents[: documents.find("Document [7]")], documents[cut:]
    end_of_second = docs.find("\n\nDocument [3]")
    assert cut > 0 and end_of_second > 0
    note = f" Its catalogue number in the archive is {FACT}."
    return f"{docs[:end_of_second]}{note}{docs[end_of_second:]}", question


def _chat_messages(context: tuple[str, str]) -> list[dict[str, Any]]:
    docs, question = context
    return [{"role": "system", "content": "Answer from the documents."}, {"role": "user", "content": docs + question}]


def _openai(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)


def _anthropic(gateway: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway, api_key=key, max_retries=0)


# --- chat completions ----------------------------------------------------------------------

def _chat(gateway: str, key: str, context: tuple[str, str], model: str, stream: bool, headers: dict[str, str],
          tools: list | None = None) -> tuple[str, list[Any], str, dict[str, Any] | None, httpx.Headers]:
    """(text, tool calls, finish reason, usage, response headers) as the client saw them."""
    client = _openai(gateway, key)
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    if not stream:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=_chat_messages(context), extra_headers=headers, **extra
        )
        completion = raw.parse()
        message = completion.choices[0].message
        return (message.content or "", list(message.tool_calls or []), completion.choices[0].finish_reason,
                completion.usage.model_dump() if completion.usage else None, raw.headers)
    text, calls, finish, usage = [], {}, None, None
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=_chat_messages(context), stream=True, stream_options={"include_usage": True},
        extra_headers=headers, **extra,
    ) as response:
        for chunk in response.parse():
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                for call in choice.delta.tool_calls or []:
                    entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                    if call.function and call.function.name:
                        entry["name"] = call.function.name
                    if call.function and call.function.arguments:
                        entry["arguments"] += call.function.arguments
                finish = choice.finish_reason or finish
        headers_seen = response.headers
    return "".join(text), [calls[i] for i in sorted(calls)], finish, usage, headers_seen


def _names(calls: list[Any]) -> list[str]:
    return [call["name"] if isinstance(call, dict) else call.function.name for call in calls]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_the_gateway_answers_the_retrieve_call_itself(gateway: str, key: str, context, stream: bool) -> None:
    text, calls, finish, usage, headers = _chat(gateway, key, context, "scripted", stream, LOSSLESS)
    assert headers["x-compression"] == "compressed"
    assert FACT in text and "FOUND" in text, text  # found only in a ccproxy_retrieve result
    assert calls == [] and finish == "stop"  # the client never sees the tool
    assert usage is not None and usage["completion_tokens"] == 10  # two rounds of 5
    if stream:  # the headers left before any usage existed: our count of the first round
        assert usage["prompt_tokens"] > int(headers["x-tokens-after"])
    else:  # the upstream's count, every round's
        assert usage["prompt_tokens"] == int(headers["x-tokens-after"])


def test_chat_whole_usage_is_every_rounds_and_the_event_agrees(gateway: str, key: str, context, database_url: str) -> None:
    _, _, _, usage, headers = _chat(gateway, key, context, "scripted", False, LOSSLESS)
    assert usage is not None
    assert int(headers["x-tokens-after"]) == usage["prompt_tokens"]  # the upstream's sum of rounds
    events = _wait_events(database_url, lambda e: e["kind"] == "chat" and e["prompt_tokens"] == usage["prompt_tokens"])
    event = events[-1]
    assert event["completion_tokens"] == usage["completion_tokens"] == 10  # two rounds of 5
    assert event["tokens_before"] - event["tokens_after"] == event["tokens_saved"]


def test_chat_an_id_not_held_is_a_tool_error_for_the_model(gateway: str, key: str, context) -> None:
    for stream in (False, True):
        text, calls, finish, _, _ = _chat(gateway, key, context, "expired", stream, LOSSLESS)
        assert "RETRIEVE-ERROR" in text and calls == [] and finish == "stop"


def test_chat_a_call_beside_the_clients_tool_leaves_the_client_its_own(gateway: str, key: str, context) -> None:
    for stream in (False, True):
        text, calls, finish, _, _ = _chat(gateway, key, context, "mixed", stream, LOSSLESS, tools=[WEATHER_TOOL_CHAT])
        assert _names(calls) == ["get_weather"] and finish == "tool_calls"


def test_lossy_mode_offers_no_tool(gateway: str, key: str, context) -> None:
    text, calls, _, _, headers = _chat(gateway, key, context, "scripted", False, {"x-compression-ratio": "0.2"})
    assert headers["x-compression"] == "compressed" and "NO-MARKERS" in text and calls == []


def test_citation_mode_points_at_the_retrieve_route(gateway: str, key: str, context) -> None:
    headers = {"x-compression-mode": "citation", "x-compression-ratio": "0.2"}
    text, calls, _, _, _ = _chat(gateway, key, context, "scripted", False, headers)
    assert text.startswith("CITED ") and calls == []
    ref = text.split()[1]
    got = httpx.get(f"{gateway}/v1/retrieve/{ref}", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert got.status_code == 200
    assert got.json()["original_content"] in context[0]  # an exact stretch of what was sent


# --- responses -----------------------------------------------------------------------------

def _responses(gateway: str, key: str, context: tuple[str, str], model: str, stream: bool, tools: list | None = None):
    client = _openai(gateway, key)
    docs, question = context
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    items = [{"role": "user", "content": docs + question}]
    if not stream:
        response = client.responses.create(model=model, input=items, instructions="Answer from the documents.",
                                           extra_headers=LOSSLESS, **extra)
        return response.output_text, [o for o in response.output if o.type == "function_call"], response.usage, response
    deltas, completed = [], None
    for event in client.responses.create(model=model, input=items, stream=True, extra_headers=LOSSLESS, **extra):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.output_item.added" and event.item.type == "function_call":
            deltas.append(f"<call {event.item.name}>")
        if event.type == "response.completed":
            completed = event.response
    assert completed is not None
    calls = [o for o in completed.output if o.type == "function_call"]
    return "".join(deltas), calls, completed.usage, completed


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_responses_the_gateway_answers_the_retrieve_call_itself(gateway: str, key: str, context, stream: bool) -> None:
    text, calls, usage, response = _responses(gateway, key, context, "scripted", stream)
    assert FACT in text and "<call" not in text, text
    assert calls == []
    assert all(item.type != "function_call" for item in response.output)
    assert usage is not None and usage.output_tokens == 10  # two rounds


def test_responses_expired_and_mixed(gateway: str, key: str, context) -> None:
    for stream in (False, True):
        text, calls, _, _ = _responses(gateway, key, context, "expired", stream)
        assert "RETRIEVE-ERROR" in text and calls == []
        _, calls, _, _ = _responses(gateway, key, context, "mixed", stream, tools=[WEATHER_TOOL_RESPONSES])
        assert [c.name for c in calls] == ["get_weather"]


# --- messages ------------------------------------------------------------------------------

def _messages(gateway: str, key: str, context: tuple[str, str], model: str, stream: bool, tools: list | None = None):
    client = _anthropic(gateway, key)
    docs, question = context
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    arguments = dict(model=model, max_tokens=64, system="Answer from the documents.",
                     messages=[{"role": "user", "content": docs + question}], extra_headers=LOSSLESS, **extra)
    if not stream:
        message = client.messages.create(**arguments)
    else:
        with client.messages.stream(**arguments) as events:
            message = events.get_final_message()
    text = "".join(block.text for block in message.content if block.type == "text")
    return text, [block for block in message.content if block.type == "tool_use"], message


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_messages_the_gateway_answers_the_retrieve_call_itself(gateway: str, key: str, context, stream: bool) -> None:
    text, calls, message = _messages(gateway, key, context, "scripted", stream)
    assert FACT in text, text
    assert calls == [] and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 10  # two rounds


def test_messages_expired_and_mixed(gateway: str, key: str, context) -> None:
    for stream in (False, True):
        text, calls, _ = _messages(gateway, key, context, "expired", stream)
        assert "RETRIEVE-ERROR" in text and calls == []
        _, calls, message = _messages(gateway, key, context, "mixed", stream, tools=[WEATHER_TOOL_MESSAGES])
        assert [c.name for c in calls] == ["get_weather"] and message.stop_reason == "tool_use"


def _wait_events(database_url: str, match) -> list[dict]:
    deadline = time.monotonic() + 30
    while True:
        found = [e for e in account_events(database_url, ACCOUNT) if match(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
