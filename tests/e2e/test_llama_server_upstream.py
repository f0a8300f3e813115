"""The baseline for the Anthropic and Responses tests: llama.cpp's native ``llama-server`` on
SmolLM2 answers the official clients directly, with no gateway in between.

- Anthropic SDK: ``messages.create``, ``messages.stream``, ``messages.count_tokens``;
- OpenAI SDK: ``responses.create`` streamed and not, ``chat.completions.create``;
- a tool exchange in the history (Anthropic ``tool_use``/``tool_result`` blocks, Responses
  ``function_call``/``function_call_output`` items) renders through SmolLM2's chat template;
- a wrong key is a 401 on both APIs; a bad body a 400 in OpenAI's error shape on every route.

Anthropic usage follows Anthropic's split: ``input_tokens`` is the part of the prompt that missed
llama.cpp's prompt cache, ``cache_read_input_tokens`` the part that hit it; their sum is what
``count_tokens`` says. Responses usage follows OpenAI's: ``input_tokens`` is the whole prompt.
SmolLM2's chat template has no tool support: tool definitions and the tool calls of earlier turns
are left out of the prompt (tool results are kept, as a ``tool`` turn), and the model never calls
a tool.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import UPSTREAM_KEY

pytestmark = pytest.mark.e2e

MODEL = "smollm2-upstream"
QUESTION = "What is the capital of France? Answer in one word."
MAX_TOKENS = 16
# anthropic 2.x's messages.create has no temperature parameter any more; llama-server reads it.
GREEDY = {"temperature": 0}


def prompt_tokens(usage: anthropic.types.Usage) -> int:
    """The whole prompt of an Anthropic answer: the cached part is counted apart."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


# A client per test: llama-server closes the connection after every streamed answer while its
# headers say keep-alive (see test_a_stream_closes_its_connection), so a pooled connection reused
# after a stream fails now and then with "Server disconnected without sending a response".
@pytest.fixture
def claude(llama_server: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=llama_server, api_key=UPSTREAM_KEY, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture
def oai(llama_server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{llama_server}/v1", api_key=UPSTREAM_KEY, max_retries=0, timeout=120) as client:
        yield client


# --- Anthropic Messages -------------------------------------------------------------------


def test_messages_create(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=MODEL, max_tokens=MAX_TOKENS, extra_body=GREEDY, messages=[{"role": "user", "content": QUESTION}]
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text.strip()
    assert message.stop_reason in {"end_turn", "max_tokens"}
    assert message.usage.input_tokens > 0  # the last prompt token is always evaluated again
    assert 0 < message.usage.output_tokens <= MAX_TOKENS


def test_messages_stream(claude: anthropic.Anthropic) -> None:
    events: list[str] = []
    with claude.messages.stream(
        model=MODEL, max_tokens=MAX_TOKENS, extra_body=GREEDY, messages=[{"role": "user", "content": QUESTION}]
    ) as stream:
        for event in stream:
            events.append(event.type)
        final = stream.get_final_message()
    # The SDK adds its own "text" events beside the wire's content_block_delta.
    wire = [e for e in events if e not in {"text", "input_json", "citation", "thinking", "signature"}]
    assert wire[0] == "message_start" and wire[-1] == "message_stop"
    assert "content_block_start" in wire and "content_block_delta" in wire and "content_block_stop" in wire
    assert "message_delta" in wire
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].text.strip()
    assert final.stop_reason in {"end_turn", "max_tokens"}
    assert final.usage.input_tokens > 0
    assert 0 < final.usage.output_tokens <= MAX_TOKENS


def test_messages_stream_matches_non_stream(claude: anthropic.Anthropic) -> None:
    """Greedy decoding: the streamed text and usage are the non-streamed ones."""
    kwargs = dict(model=MODEL, max_tokens=MAX_TOKENS, extra_body=GREEDY, messages=[{"role": "user", "content": QUESTION}])
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == whole.content[0].text
    assert prompt_tokens(streamed.usage) == prompt_tokens(whole.usage)
    assert streamed.usage.output_tokens == whole.usage.output_tokens


def test_messages_count_tokens(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    counted = claude.messages.count_tokens(model=MODEL, messages=messages)
    assert counted.input_tokens > 0
    answered = claude.messages.create(model=MODEL, max_tokens=1, extra_body=GREEDY, messages=messages)
    assert counted.input_tokens == prompt_tokens(answered.usage)
    longer = claude.messages.count_tokens(
        model=MODEL, system="You are terse.", messages=[*messages, {"role": "assistant", "content": "Paris."},
                                                        {"role": "user", "content": "And of Italy?"}],
    )
    assert longer.input_tokens > counted.input_tokens


def test_messages_tool_exchange_in_history(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=MODEL, max_tokens=MAX_TOKENS, extra_body=GREEDY,
        tools=[{
            "name": "get_weather", "description": "The weather in a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }],
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "Sunny, 21 C."},
            ]},
        ],
    )
    assert message.content and message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_messages_wrong_key(llama_server: str) -> None:
    client = anthropic.Anthropic(base_url=llama_server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])


# --- OpenAI Responses and Chat Completions --------------------------------------------------


def test_responses_create(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model=MODEL, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=0)
    assert response.object == "response" and response.status == "completed"
    assert response.output_text.strip()
    assert response.usage is not None
    assert response.usage.input_tokens > 0
    assert 0 < response.usage.output_tokens <= MAX_TOKENS
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_responses_stream(oai: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=0)
    whole = oai.responses.create(**kwargs)
    events = list(oai.responses.create(**kwargs, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    completed = events[-1].response
    assert text == completed.output_text == whole.output_text
    assert completed.usage is not None
    assert completed.usage.input_tokens == whole.usage.input_tokens
    assert completed.usage.output_tokens == whole.usage.output_tokens


def test_responses_tool_exchange_in_history(oai: openai.OpenAI) -> None:
    response = oai.responses.create(
        model=MODEL, max_output_tokens=MAX_TOKENS, temperature=0,
        tools=[{
            "type": "function", "name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }],
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": "call_01", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_01", "output": "Sunny, 21 C."},
        ],
    )
    assert response.output and response.usage.input_tokens > 0 and response.usage.output_tokens > 0


def test_chat_completions(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model=MODEL, max_tokens=MAX_TOKENS, temperature=0, messages=[{"role": "user", "content": QUESTION}]
    )
    assert completion.choices[0].message.content.strip()
    assert completion.usage.prompt_tokens > 0 and 0 < completion.usage.completion_tokens <= MAX_TOKENS


def test_responses_wrong_key(llama_server: str) -> None:
    client = openai.OpenAI(base_url=f"{llama_server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.responses.create(model=MODEL, input="hi", max_output_tokens=4)


def test_bad_bodies_are_openai_shaped_400s(llama_server: str) -> None:
    """llama-server answers errors in OpenAI's shape, {"error": {"code", "message", "type"}}, on the
    Anthropic routes too. (A body without ``messages`` on /v1/messages is a 500 there, and JSON
    that does not parse is a 500 on every route.)"""
    headers = {"x-api-key": UPSTREAM_KEY}
    bad = {
        "/v1/messages": {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": 5}]},
        "/v1/messages/count_tokens": {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        "/v1/responses": {"model": MODEL, "input": 5},
    }
    for path, body in bad.items():
        answer = httpx.post(f"{llama_server}{path}", headers=headers, json=body, timeout=60)
        assert answer.status_code == 400, (path, answer.text)
        error = answer.json()["error"]
        assert error["code"] == 400 and error["type"] == "invalid_request_error" and error["message"], path


def test_over_the_context_is_a_400_before_the_stream(llama_server: str) -> None:
    headers = {"x-api-key": UPSTREAM_KEY}
    long_text = "hello " * 9000  # > the fixture's 8192-token context
    bodies = {
        "/v1/messages": {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": long_text}]},
        "/v1/responses": {"model": MODEL, "max_output_tokens": 4, "input": long_text},
    }
    for path, body in bodies.items():
        for stream in (False, True):
            answer = httpx.post(f"{llama_server}{path}", headers=headers, json={**body, "stream": stream}, timeout=60)
            assert answer.status_code == 400, (path, stream, answer.text)
            assert answer.json()["error"]["type"] == "exceed_context_size_error"


def test_a_stream_closes_its_connection(llama_server: str) -> None:
    """A quirk of the pinned llama-server that callers must survive: its chunked-content provider
    returns false after the last chunk, which cpp-httplib takes for a cancel, so the connection is
    closed after every streamed answer although the answer said ``Keep-Alive``. A plain answer
    leaves the connection open. (If this fails, llama.cpp fixed it.)"""
    address = urlsplit(llama_server)
    headers = {"x-api-key": UPSTREAM_KEY, "Content-Type": "application/json"}
    count = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    outcomes = {}
    for stream in (False, True):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
        body = {"model": MODEL, "max_tokens": 2, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        connection.request("POST", "/v1/messages", json.dumps(body), headers)
        first = connection.getresponse()
        first.read()
        assert first.status == 200 and "timeout=" in (first.getheader("Keep-Alive") or "")
        try:
            connection.request("POST", "/v1/messages/count_tokens", count, headers)
            second = connection.getresponse()
            outcomes[stream] = second.status
            second.read()
        except (ConnectionError, http.client.HTTPException):
            outcomes[stream] = "closed"
        finally:
            connection.close()
    assert outcomes == {False: 200, True: "closed"}
