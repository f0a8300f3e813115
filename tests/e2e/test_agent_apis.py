"""``/v1/responses`` and Anthropic's ``/v1/messages`` through a real Gateway, with the official
``openai`` and ``anthropic`` clients, in front of llama.cpp's own ``llama-server`` (which serves
both routes natively), and ``/v1/responses`` bridged to chat on the embedded model.

Compression is proven at the upstream: the ``x-tokens-after`` a request reports equals the
input tokens llama-server itself counted and billed, and is below ``x-tokens-before``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from harness.servers import create_key
from nqdata.items import Item
from tests.e2e.conftest import UPSTREAM_KEY, _gateway_to
from tests.e2e.usage_db import account_events

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
# Compress whatever is over 200 tokens, to a fifth: the RAG item (~3 k tokens) always is.
COMPRESSING = {"x-compression-ratio": "0.2"}


@pytest.fixture(scope="module")
def apis_gateway(
    llama_server: str, remote_compressor: str, database_url: str, logs_dir: Path
) -> Iterator[str]:
    """llama-server for both APIs. OpenAI callers bring their own provider key (so every OpenAI
    route is relayed, not only the metered ones); the server holds the Anthropic one."""
    yield from _gateway_to(
        f"{llama_server}/v1", remote_compressor, database_url, logs_dir, "apis",
        CCPROXY_ANTHROPIC_UPSTREAM_URL=f"{llama_server}/v1",
        CCPROXY_ANTHROPIC_UPSTREAM_API_KEY=UPSTREAM_KEY,
        CCPROXY_COMPRESSION_THRESHOLD_TOKENS="200",
    )


ACCOUNT = "agent-apis"


@pytest.fixture(scope="module")
def key(database_url: str) -> str:
    return create_key({"CCPROXY_DATABASE_URL": database_url}, ACCOUNT)


@pytest.fixture(scope="module")
def usage_events(database_url: str):
    """``usage_events(kind, at_least)``: this module's usage events of one kind, once there are enough
    (the gateway flushes every 0.2 s in tests) or at a 30 s deadline."""

    def wait(kind: str, at_least: int) -> list[dict]:
        deadline = time.monotonic() + 30
        while True:
            found = [e for e in account_events(database_url, ACCOUNT) if e["kind"] == kind]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    return wait


def _question_and_documents(item: Item) -> tuple[str, str]:
    messages = item.messages()
    content = messages[-1]["content"]
    documents, _, question = content.rpartition("\n\n")
    return documents, question


# --- the Responses API -------------------------------------------------------------------------


def _openai(gateway: str, key: str) -> openai.OpenAI:
    """The caller's own provider key as the Bearer token, its ccproxy key beside it."""
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=UPSTREAM_KEY, default_headers={"x-api-key": key})


def test_responses_rag_request_reaches_llama_server_compressed(apis_gateway: str, key: str, usage_events, rag_item: Item) -> None:
    client = _openai(apis_gateway, key)
    documents, question = _question_and_documents(rag_item)
    raw = client.responses.with_raw_response.create(
        model=MODEL, instructions="Answer from the documents.", input=f"{documents}\n\n{question}",
        max_output_tokens=8, temperature=0, extra_headers=COMPRESSING,
    )
    response = raw.parse()
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert raw.headers["x-compression"] == "compressed"
    assert int(raw.headers["x-tokens-after"]) == response.usage.input_tokens  # what llama-server counted
    assert int(raw.headers["x-tokens-after"]) < 0.5 * int(raw.headers["x-tokens-before"])
    events = usage_events("responses", 1)
    assert events[-1]["prompt_tokens"] == response.usage.input_tokens
    assert events[-1]["completion_tokens"] == response.usage.output_tokens


def test_responses_stream_keeps_its_typed_events_and_reports_usage(apis_gateway: str, key: str, usage_events, rag_item: Item) -> None:
    client = _openai(apis_gateway, key)
    documents, question = _question_and_documents(rag_item)
    # Iterated as sent: llama-server's deltas omit content_index, which the SDK's accumulating
    # ``responses.stream`` helper needs (an upstream gap, relayed as it is).
    stream = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": documents}, {"role": "user", "content": question}],
        max_output_tokens=8, temperature=0, extra_headers=COMPRESSING, stream=True,
    )
    received = list(stream)
    kinds = [event.type for event in received]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    final = received[-1].response
    assert final.usage is not None and final.usage.input_tokens > 0
    events = usage_events("responses", 2)
    assert events[-1]["stream"] is True and events[-1]["prompt_tokens"] == final.usage.input_tokens
    assert events[-1]["compression"] == "compressed"


def test_a_tool_exchange_in_responses_history_is_forwarded_valid(apis_gateway: str, key: str, rag_item: Item) -> None:
    """An old call and its output may go as one unit; what arrives is still a request the
    upstream accepts (no output without its call)."""
    client = _openai(apis_gateway, key)
    documents, question = _question_and_documents(rag_item)
    items = [
        {"role": "user", "content": "Find the weather in Oslo."},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Rain, 4 degrees. " * 40},
        # llama-server wants the type on an assistant message item ("Cannot determine type of 'item'").
        {"type": "message", "role": "assistant", "content": "It rains in Oslo."},
        {"role": "user", "content": f"{documents}\n\n{question}"},
    ]
    raw = client.responses.with_raw_response.create(
        model=MODEL, input=items, max_output_tokens=4, temperature=0, extra_headers=COMPRESSING
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["x-compression"] == "compressed"
    assert int(raw.headers["x-tokens-after"]) == raw.parse().usage.input_tokens


def test_responses_errors_come_in_openai_shape(apis_gateway: str, key: str) -> None:
    client = _openai(apis_gateway, key)
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=MODEL, input=42)  # type: ignore[arg-type]
    assert raised.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        _openai(apis_gateway, "ccp_wrong_key").responses.create(model=MODEL, input="hi")


def test_responses_are_bridged_to_chat_on_the_embedded_model(embedded_gateway: str, embedded_key: str) -> None:
    client = openai.OpenAI(base_url=f"{embedded_gateway}/v1", api_key=embedded_key)
    response = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0)
    assert response.output_text and response.usage.input_tokens > 0
    received = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0, stream=True))
    text = "".join(event.delta for event in received if event.type == "response.output_text.delta")
    assert received[-1].type in ("response.completed", "response.incomplete")  # 8 tokens: usually cut
    final = received[-1].response
    assert text == final.output_text and final.usage.output_tokens > 0


# --- Anthropic's Messages API ------------------------------------------------------------------


def _anthropic(gateway: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway, api_key=key)


def test_messages_rag_request_reaches_llama_server_compressed(apis_gateway: str, key: str, usage_events, rag_item: Item) -> None:
    client = _anthropic(apis_gateway, key)
    documents, question = _question_and_documents(rag_item)
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=8, system="Answer from the documents.",
        messages=[{"role": "user", "content": f"{documents}\n\n{question}"}], extra_headers=COMPRESSING,
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    usage = message.usage
    billed = usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)
    assert raw.headers["x-compression"] == "compressed"
    assert int(raw.headers["x-tokens-after"]) == billed
    assert int(raw.headers["x-tokens-after"]) < 0.5 * int(raw.headers["x-tokens-before"])
    events = usage_events("messages", 1)
    assert events[-1]["prompt_tokens"] == billed and events[-1]["completion_tokens"] == usage.output_tokens


def test_messages_stream_keeps_its_framing_and_usage_is_recorded(apis_gateway: str, key: str, usage_events, rag_item: Item) -> None:
    client = _anthropic(apis_gateway, key)
    documents, question = _question_and_documents(rag_item)
    before = len(usage_events("messages", 0))
    with client.messages.stream(
        model=MODEL, max_tokens=8,
        messages=[{"role": "user", "content": f"{documents}\n\n{question}"}], extra_headers=COMPRESSING,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    events = usage_events("messages", before + 1)
    assert events[-1]["stream"] is True and events[-1]["completion_tokens"] == final.usage.output_tokens
    assert events[-1]["compression"] == "compressed"


def test_a_tool_exchange_in_messages_history_is_forwarded_valid(apis_gateway: str, key: str, rag_item: Item) -> None:
    client = _anthropic(apis_gateway, key)
    documents, question = _question_and_documents(rag_item)
    messages = [
        {"role": "user", "content": "Find the weather in Oslo."},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Rain, 4 degrees. " * 40},
        ]},
        {"role": "assistant", "content": "It rains in Oslo."},
        {"role": "user", "content": f"{documents}\n\n{question}"},
    ]
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=4, messages=messages, extra_headers=COMPRESSING,
        tools=[{"name": "weather", "description": "Weather of a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["x-compression"] == "compressed"


def test_count_tokens_counts_what_would_be_forwarded(apis_gateway: str, key: str, rag_item: Item) -> None:
    client = _anthropic(apis_gateway, key)
    documents, question = _question_and_documents(rag_item)
    messages = [{"role": "user", "content": f"{documents}\n\n{question}"}]
    off = client.messages.count_tokens(model=MODEL, messages=messages, extra_headers={"x-compression": "off"})
    on = client.messages.count_tokens(model=MODEL, messages=messages, extra_headers=COMPRESSING)
    assert 0 < on.input_tokens < 0.5 * off.input_tokens


def test_messages_errors_come_in_anthropic_shape(apis_gateway: str, key: str) -> None:
    client = _anthropic(apis_gateway, key)
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "system", "content": "x"}])  # type: ignore[list-item]
    assert raised.value.body["type"] == "error"  # type: ignore[index]
    assert raised.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError) as refused:
        _anthropic(apis_gateway, "ccp_wrong_key").messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # A gateway without an Anthropic upstream says so, in Anthropic's shape.


def test_messages_without_an_anthropic_upstream_is_an_anthropic_404(embedded_gateway: str, embedded_key: str) -> None:
    answer = httpx.post(
        f"{embedded_gateway}/v1/messages", headers={"x-api-key": embedded_key, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}, timeout=30,
    )
    assert answer.status_code == 404
    assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == "not_found_error"
    assert "CCPROXY_ANTHROPIC_UPSTREAM_URL" in answer.json()["error"]["message"]


def test_a_relayed_stream_that_reports_usage_writes_a_usage_event(apis_gateway: str, key: str, usage_events) -> None:
    """Legacy completions, relayed: its streamed usage chunk (asked for) becomes a usage event."""
    client = _openai(apis_gateway, key)
    chunks = list(client.completions.create(
        model=MODEL, prompt="One, two,", max_tokens=3, stream=True, stream_options={"include_usage": True}
    ))
    usage = chunks[-1].usage
    assert usage is not None  # llama-server reports it in the last chunk
    [event] = usage_events("completions", 1)
    assert event["stream"] is True
    assert (event["prompt_tokens"], event["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)


EARLIER_QUESTIONS = ("Which of these documents mentions a year?", "Which document is about a place?")


def _turns(item: Item, n: int) -> list[str]:
    """n user turns, each a share of the item's documents and a question of its own (the item's
    in the last): compressing the history again against the newest question would change it."""
    documents, question = _question_and_documents(item)
    pieces = documents.split("\n\n")
    size = -(-len(pieces) // n)
    questions = [*EARLIER_QUESTIONS[: n - 1], question]
    return ["\n\n".join(pieces[k * size : (k + 1) * size] + [questions[k]]) for k in range(n)]


REPLY = "I could not find it in these documents."


def test_a_responses_history_is_resent_as_forwarded_and_llama_server_reuses_its_cache(
    apis_gateway: str, key: str, rag_item: Item
) -> None:
    """Three requests of one conversation: each compressed, each later one starting with what
    the earlier one forwarded, so llama-server's prompt cache holds all of it (cached_tokens)."""
    client = _openai(apis_gateway, key)
    items: list[dict] = []
    previous_input = 0
    for k, text in enumerate(_turns(rag_item, 3)):
        if k:
            items.append({"type": "message", "role": "assistant", "content": REPLY})
        items.append({"role": "user", "content": text})
        raw = client.responses.with_raw_response.create(
            model=MODEL, input=items, max_output_tokens=2, temperature=0, extra_headers=COMPRESSING
        )
        usage = raw.parse().usage
        assert raw.headers["x-compression"] == "compressed"
        assert int(raw.headers["x-tokens-after"]) == usage.input_tokens
        if k:
            assert usage.input_tokens_details.cached_tokens >= previous_input - 2, (k, usage)
        previous_input = usage.input_tokens


def test_a_messages_history_is_resent_as_forwarded_and_llama_server_reuses_its_cache(
    apis_gateway: str, key: str, rag_item: Item
) -> None:
    client = _anthropic(apis_gateway, key)
    messages: list[dict] = []
    previous_prompt = 0
    for k, text in enumerate(_turns(rag_item, 3)):
        if k:
            messages.append({"role": "assistant", "content": REPLY})
        messages.append({"role": "user", "content": text})
        raw = client.messages.with_raw_response.create(
            model=MODEL, max_tokens=2, messages=messages, extra_headers=COMPRESSING
        )
        usage = raw.parse().usage
        read = usage.cache_read_input_tokens or 0
        assert raw.headers["x-compression"] == "compressed"
        assert int(raw.headers["x-tokens-after"]) == usage.input_tokens + read
        if k:
            assert read >= previous_prompt - 2, (k, usage)
        previous_prompt = usage.input_tokens + read


def _tool_output(step: int) -> str:
    lines = [f"src/module{step}/file{j}.py:{j}: unrelated noise token{step}x{j}" for j in range(60)]
    lines[7 + step] = f"src/treaty/parser.py:{step}: the treaty parser fails on dates"
    return "\n".join(lines)


def test_an_agent_loops_older_tool_results_reach_llama_server_compressed(apis_gateway: str, key: str) -> None:
    """Three steps of an agent loop through /v1/messages: the two older tool results are cut
    to what the task needs, the newest is whole, and the upstream accepts every call/result pair."""
    client = _anthropic(apis_gateway, key)
    messages: list[dict] = [{"role": "user", "content": "Find where the treaty parser fails."}]
    for k in range(3):
        messages.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"toolu_{k}", "name": "grep", "input": {"pattern": f"treaty {k}"}},
        ]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{k}", "content": _tool_output(k)},
        ]})
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=2, messages=messages, extra_headers={"x-compression-ratio": "0.2"},
        tools=[{"name": "grep", "description": "Search the code.",
                "input_schema": {"type": "object", "properties": {"pattern": {"type": "string"}}}}],
    )
    usage = raw.parse().usage
    billed = usage.input_tokens + (usage.cache_read_input_tokens or 0)
    assert raw.headers["x-compression"] == "compressed"
    assert int(raw.headers["x-tokens-after"]) == billed
    assert int(raw.headers["x-tokens-saved"]) > 0.3 * int(raw.headers["x-tokens-before"])
