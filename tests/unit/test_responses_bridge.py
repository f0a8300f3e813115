"""The Responses API bridged onto chat completions: requests, answers and streams, each read
back with the official openai SDK's own types (and its client, over an in-memory transport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from ccproxy.protocol import ProxyError, error_body, sse_event, sse_fields
from ccproxy.responses.bridge import (
    UNSUPPORTED,
    ResponsesEventStream,
    bridged,
    chat_request_from_responses,
    responses_from_chat,
)
from ccproxy.upstream import UpstreamReply

EVENTS = TypeAdapter(ResponseStreamEvent)
USAGE = {
    "prompt_tokens": 30,
    "completion_tokens": 5,
    "total_tokens": 35,
    "prompt_tokens_details": {"cached_tokens": 8},
}
WEATHER_TOOL = {
    "type": "function",
    "name": "weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": False,
}


# --- requests -------------------------------------------------------------------------------


def test_a_string_input_with_instructions_and_settings() -> None:
    chat = chat_request_from_responses(
        {
            "model": "m",
            "input": "Hello",
            "instructions": "Be brief.",
            "max_output_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "store": True,
            "ccproxy": {"compression": "off"},
        }
    )
    assert chat == {
        "model": "m",
        "temperature": 0.2,
        "top_p": 0.9,
        "ccproxy": {"compression": "off"},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        "max_tokens": 50,
    }


def text(kind: str, words: str) -> dict:
    return {"type": kind, "text": words}


def function_call(call_id: str, arguments: str) -> dict:
    return {"type": "function_call", "call_id": call_id, "name": "weather", "arguments": arguments}


def chat_call(call_id: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "weather", "arguments": arguments}}


def test_items_with_a_tool_exchange_become_chat_messages() -> None:
    image = {"type": "input_image", "image_url": "https://x/a.png", "detail": "low"}
    parts = [text("input_text", "Hi, "), text("input_text", "ok")]
    chat = chat_request_from_responses(
        {
            "model": "m",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": parts},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
                {"type": "message", "role": "assistant", "content": [text("output_text", "Checking.")]},
                function_call("c1", '{"city":"Paris"}'),
                function_call("c2", '{"city":"Rome"}'),
                {"type": "function_call_output", "call_id": "c1", "output": "18C"},
                {"type": "function_call_output", "call_id": "c2", "output": [text("input_text", "21C")]},
                function_call("c3", "{}"),
                {"role": "user", "content": [image, text("input_text", "And this?")]},
            ],
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "name": "weather"},
            "parallel_tool_calls": False,
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Hi, ok"},  # text parts joined: chat templates want a string
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [chat_call("c1", '{"city":"Paris"}'), chat_call("c2", '{"city":"Rome"}')],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "21C"},
        {"role": "assistant", "content": None, "tool_calls": [chat_call("c3", "{}")]},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}},
                {"type": "text", "text": "And this?"},
            ],
        },
    ]
    function = {key: WEATHER_TOOL[key] for key in ("name", "description", "parameters", "strict")}
    assert chat["tools"] == [{"type": "function", "function": function}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["parallel_tool_calls"] is False


def test_a_past_refusal_is_what_the_assistant_said() -> None:
    refusal = {"type": "refusal", "refusal": "I can't."}
    chat = chat_request_from_responses({"model": "m", "input": [{"role": "assistant", "content": [refusal]}]})
    assert chat["messages"] == [{"role": "assistant", "content": "I can't."}]


SCHEMA = {"name": "p", "schema": {"type": "object"}, "strict": True}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ({"format": {"type": "text"}}, None),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        (
            {"format": {"type": "json_schema", **SCHEMA}},
            {"type": "json_schema", "json_schema": SCHEMA},
        ),
    ],
)
def test_text_format_becomes_response_format(text: dict, expected: dict | None) -> None:
    chat = chat_request_from_responses({"model": "m", "input": "x", "text": text})
    assert chat.get("response_format") == expected


def test_a_stream_asks_for_the_usage_chunk() -> None:
    chat = chat_request_from_responses({"model": "m", "input": "x", "stream": True})
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


SECRET = "s3cret-words"


IMAGE_BY_URL = {"type": "input_image", "image_url": SECRET}


def user_part(part: dict) -> dict:
    return {"input": [{"role": "user", "content": [part]}]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tools": [WEATHER_TOOL, {"type": "file_search", "vector_store_ids": [SECRET]}]}, "tools[1]"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": [{"type": "item_reference", "id": SECRET}]}, "input[0]"),
        (user_part({"type": "input_file", "file_id": SECRET}), "input[0].content[0]"),
        (user_part({"type": "input_image", "file_id": SECRET}), "input[0].content[0]"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": [IMAGE_BY_URL]}]},
            "input[0].output",
        ),
        ({"text": {"format": {"type": SECRET}}}, "text.format"),
    ],
)
def test_what_a_chat_upstream_cannot_do_is_refused(body: dict, param: str) -> None:
    with pytest.raises(ProxyError) as caught:
        chat_request_from_responses({"model": "m", "input": "x", **body})
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, param, UNSUPPORTED)
    assert SECRET not in caught.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": 5}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"role": "tool", "content": SECRET}]}, "input[0].role"),
        ({"input": [{"type": "function_call", "name": SECRET}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output"),
        ({"instructions": ["x"]}, "instructions"),
    ],
)
def test_malformed_requests_are_refused(body: dict, param: str) -> None:
    with pytest.raises(ProxyError) as caught:
        chat_request_from_responses({"model": "m", **body})
    assert (caught.value.status, caught.value.param) == (400, param)
    assert SECRET not in caught.value.message


# --- whole answers --------------------------------------------------------------------------


def chat_answer(message: dict, finish: str = "stop") -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "smollm2",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": USAGE,
    }


def convert(answer: dict, request: dict | None = None) -> Response:
    request = request or {"model": "m", "input": "x"}
    converted = responses_from_chat(answer, request, response_id="resp_1", created_at=1700000000)
    return Response.model_validate(json.loads(json.dumps(converted)))


def test_a_text_answer() -> None:
    request = {"model": "m", "input": "x", "instructions": "Be brief."}
    response = convert(chat_answer({"content": "Hi there."}), request)
    assert (response.id, response.status, response.model) == ("resp_1", "completed", "smollm2")
    assert response.instructions == "Be brief." and response.output_text == "Hi there."
    assert response.output[0].id.startswith("msg_")
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (30, 5, 35)
    assert usage.input_tokens_details.cached_tokens == 8 and usage.output_tokens_details.reasoning_tokens == 0
    assert (response.tool_choice, response.tools, response.parallel_tool_calls) == ("auto", [], True)


def test_tool_calls_become_function_call_items() -> None:
    calls = [chat_call("call_a", '{"city":"Paris"}'), chat_call("call_b", '{"city":"Rome"}')]
    request = {"model": "m", "input": "x", "tools": [WEATHER_TOOL], "tool_choice": "required"}
    response = convert(chat_answer({"content": None, "tool_calls": calls}, "tool_calls"), request)
    assert response.status == "completed"
    assert [(item.type, item.call_id, item.name, item.arguments) for item in response.output] == [
        ("function_call", "call_a", "weather", '{"city":"Paris"}'),
        ("function_call", "call_b", "weather", '{"city":"Rome"}'),
    ]
    assert all(item.id.startswith("fc_") for item in response.output)
    assert response.tools[0].name == "weather" and response.tool_choice == "required"


def test_an_answer_cut_at_the_token_limit_is_incomplete() -> None:
    response = convert(chat_answer({"content": "It was a dark"}, "length"))
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.output_text == "It was a dark"


# --- streams ----------------------------------------------------------------------------------


def text_chunks(*pieces: str, finish: str | None = "stop") -> list[dict]:
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "model": "smollm2"}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in pieces]
    if finish is not None:
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return chunks + [{"choices": [], "usage": USAGE}]


def tool_chunks() -> list[dict]:
    def call(index: int, **fields: Any) -> dict:
        return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, **fields}]}}]}

    return [
        {"choices": [{"index": 0, "delta": {"content": "Let me look."}}]},
        call(0, id="call_a", type="function", function={"name": "weather", "arguments": ""}),
        call(0, function={"arguments": '{"city":'}),
        call(1, id="call_b", type="function", function={"name": "weather", "arguments": '{"city":"Rome"}'}),
        call(0, function={"arguments": '"Paris"}'}),  # calls interleaved by index still land apart
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": USAGE},
    ]


def read_events(raw: list[bytes]) -> list[Any]:
    """Every event as the SDK reads it; its SSE event name must be its type."""
    events = []
    for event in raw:
        fields = sse_fields(event)
        parsed = EVENTS.validate_python(json.loads(fields["data"]))
        assert fields["event"] == parsed.type
        events.append(parsed)
    assert [event.sequence_number for event in events] == list(range(len(events)))
    return events


def run_stream(chunks: list[dict], request: dict | None = None) -> list[Any]:
    stream = ResponsesEventStream(request or {"model": "m", "input": "x"}, response_id="resp_1", created_at=1)
    raw = stream.start()
    for chunk in chunks:
        raw += stream.feed(chunk)
    return read_events(raw + stream.finish())


def test_a_text_stream() -> None:
    events = run_stream(text_chunks("Hel", "lo", "!"))
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[7].text == "Hello!"
    final = events[-1].response
    assert final.id == "resp_1" and final.status == "completed" and final.output_text == "Hello!"
    assert final.model == "smollm2" and final.usage is not None and final.usage.total_tokens == 35


def test_a_tool_call_stream() -> None:
    events = run_stream(tool_chunks(), {"model": "m", "input": "x", "tools": [WEATHER_TOOL]})
    kinds = [event.type for event in events]
    # The text message is done before the first call is added.
    assert kinds.index("response.output_item.done") < kinds.index("response.function_call_arguments.delta")
    done = {
        event.output_index: event.arguments
        for event in events
        if event.type == "response.function_call_arguments.done"
    }
    assert done == {1: '{"city":"Paris"}', 2: '{"city":"Rome"}'}
    final = events[-1].response
    assert final.status == "completed"
    assert [item.type for item in final.output] == ["message", "function_call", "function_call"]
    assert [(item.call_id, item.arguments) for item in final.output[1:]] == [
        ("call_a", '{"city":"Paris"}'),
        ("call_b", '{"city":"Rome"}'),
    ]


def test_a_stream_cut_at_the_limit_or_without_a_finish_is_incomplete() -> None:
    cases = [(text_chunks("a", finish="length"), "max_output_tokens"), (text_chunks("a", finish=None), None)]
    for chunks, reason in cases:
        final = run_stream(chunks)[-1]
        assert final.type == "response.incomplete"
        assert final.response.incomplete_details.reason == reason
        assert final.response.output[0].status == "incomplete"


def test_an_empty_stream_still_completes_well_formed() -> None:
    events = run_stream([{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}])
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.completed",
    ]
    assert events[-1].response.output == []


def test_an_error_inside_the_stream_ends_it_as_an_error_event() -> None:
    chunks = text_chunks("a")[:2] + [error_body("Upstream broke.", type="server_error")] + text_chunks("b")
    events = run_stream(chunks)
    assert events[-1].type == "error" and events[-1].message == "Upstream broke."


# --- the adapter, read by the official client ----------------------------------------------------


def fake_chat(
    answer: dict | None = None, chunks: list[dict] | None = None, status: int = 200, seen: list | None = None
) -> Any:
    """A chat call answering as the chat pipeline does: an error, a whole answer, or SSE events."""

    async def call_chat(body: dict, stream: bool) -> UpstreamReply:
        if seen is not None:
            seen.append((body, stream))
        if status != 200:
            failure = json.dumps(error_body("No such model.")).encode()
            return UpstreamReply(status=status, headers={}, body=failure)
        if not stream:
            return UpstreamReply(status=200, headers={}, body=json.dumps(answer).encode())

        async def events() -> AsyncIterator[bytes]:
            for chunk in chunks or []:
                yield sse_event(chunk)
            yield b"data: [DONE]\n\n"

        return UpstreamReply(status=200, headers={}, media_type="text/event-stream", events=events())

    return call_chat


def client_for(call_chat: Any) -> openai.AsyncOpenAI:
    """The official client, its HTTP answered in memory by the bridge."""

    async def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        reply = await bridged(call_chat, body, bool(body.get("stream")))
        content = reply.events if reply.events is not None else reply.body
        return httpx.Response(reply.status, headers={"content-type": reply.media_type}, content=content)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return openai.AsyncOpenAI(
        api_key="sk-test", base_url="http://ccproxy.test/v1", http_client=http, max_retries=0
    )


def test_the_official_client_reads_a_whole_answer() -> None:
    seen: list = []

    async def go() -> Any:
        client = client_for(fake_chat(answer=chat_answer({"content": "Bonjour."}), seen=seen))
        return await client.responses.create(model="m", input="Say hello.", instructions="Be brief.")

    response = asyncio.run(go())
    assert response.output_text == "Bonjour." and response.id.startswith("resp_")
    assert seen[0][1] is False and seen[0][0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_the_official_client_reads_a_stream() -> None:
    async def go() -> tuple[list[str], Any]:
        client = client_for(fake_chat(chunks=tool_chunks()))
        events = await client.responses.create(model="m", input="x", stream=True)
        kinds = [event.type async for event in events]
        async with client.responses.stream(model="m", input="x", tools=[WEATHER_TOOL]) as stream:
            final = await stream.get_final_response()
        return kinds, final

    kinds, final = asyncio.run(go())
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text == "Let me look."
    assert [item.name for item in final.output if item.type == "function_call"] == ["weather", "weather"]


def test_a_failed_chat_answer_comes_back_unchanged() -> None:
    reply = asyncio.run(bridged(fake_chat(status=404), {"model": "nope", "input": "x"}, False))
    assert reply.status == 404 and json.loads(reply.body) == error_body("No such model.")

    async def go() -> None:
        await client_for(fake_chat(status=404)).responses.create(model="nope", input="x")

    with pytest.raises(openai.NotFoundError):
        asyncio.run(go())
