"""A scripted model for lossless mode's retrieve loop: it calls ``ccproxy_retrieve`` on cue, which
a real small model will not do on demand. Chat completions, Responses and Messages; whole and
streamed answers.

Run: ``python -m tests.e2e.retrieve_upstream --port N``. What it does with a request:

- the request holds results of ``ccproxy_retrieve``: it answers ``FOUND <fact>`` with the first
  ``FACT-<digits>`` in those results, ``RETRIEVE-ERROR`` when every result is the tool's error,
  else ``NOT-FOUND``;
- else, when the ``ccproxy_retrieve`` tool is offered and the text shows markers, it calls the
  tool once for each marker id (at most 64, in one turn). The model ``expired`` asks for an id
  that was never kept; ``mixed`` also calls the client's first tool beside it;
- else, with a citation marker and no tool, it answers ``CITED <id>`` (the first marker's id);
- else it answers ``NO-MARKERS``.

Every answer reports usage: the prompt is the request body's length in bytes ÷ 16, so a
larger request costs more and tests can check that every round's prompt was added up.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TOOL = "ccproxy_retrieve"
MARKER_ID = re.compile(r"ccproxy_retrieve id=([0-9a-f]{24})")
FACT = re.compile(r"FACT-\d+")
CITATION = re.compile(r"original: /v1/retrieve/([0-9a-f]{24})")
COMPLETION_TOKENS = 5


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for inner in value.values():
            yield from _texts(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _texts(inner)


def _tool_names(body: dict[str, Any]) -> list[str]:
    names = []
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        names.append(function.get("name"))
    return names


def _results(api: str, body: dict[str, Any]) -> list[str]:
    """The texts of ccproxy_retrieve's results in the request."""
    if api == "chat":
        return [m["content"] for m in body["messages"] if m.get("role") == "tool" and isinstance(m.get("content"), str)]
    if api == "responses":
        items = body["input"] if isinstance(body["input"], list) else []
        return [i["output"] for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]
    return [
        block["content"]
        for m in body["messages"] if isinstance(m.get("content"), list)
        for block in m["content"] if block.get("type") == "tool_result" and isinstance(block.get("content"), str)
    ]


def decide(api: str, body: dict[str, Any]) -> tuple[str, list[tuple[str, str, dict[str, Any]]]]:
    """(the answer's text, its tool calls as (call id, name, arguments))."""
    results = _results(api, body)
    if results:
        for text in results:
            fact = FACT.search(text)
            if fact:
                return f"FOUND {fact.group(0)}", []
        if all(text.startswith("ccproxy_retrieve error") for text in results):
            return "RETRIEVE-ERROR", []
        return "NOT-FOUND", []
    names = _tool_names(body)
    text = "\n".join(_texts(body.get("messages") or body.get("input")))
    ids = list(dict.fromkeys(MARKER_ID.findall(text)))[:64]
    cited = CITATION.search(text)
    if cited and TOOL not in names:
        return f"CITED {cited.group(1)}", []
    if TOOL not in names or not ids:
        return "NO-MARKERS", []
    if body.get("model") == "expired":
        ids = ["0" * 24]
    calls = [(f"call_{k}", TOOL, {"id": ref}) for k, ref in enumerate(ids)]
    if body.get("model") == "mixed":
        theirs = next(name for name in names if name != TOOL)
        calls.append(("call_client", theirs, {"city": "Paris"}))
    return "Let me look that up.", calls


def _usage(api: str, raw: bytes) -> dict[str, Any]:
    prompt = len(raw) // 16
    if api == "chat":
        return {"prompt_tokens": prompt, "completion_tokens": COMPLETION_TOKENS, "total_tokens": prompt + COMPLETION_TOKENS}
    if api == "responses":
        return {"input_tokens": prompt, "output_tokens": COMPLETION_TOKENS, "total_tokens": prompt + COMPLETION_TOKENS,
                "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    return {"input_tokens": prompt, "output_tokens": COMPLETION_TOKENS}


def _sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


# --- chat completions ----------------------------------------------------------------------

def _chat_whole(body: dict[str, Any], text: str, calls: list, usage: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for cid, name, args in calls
        ]
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
            "usage": usage}


def _chat_stream(body: dict[str, Any], text: str, calls: list, usage: dict[str, Any]) -> Iterator[bytes]:
    base = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
    yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    for word in text.split(" "):
        yield _sse({**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]})
    for k, (cid, name, args) in enumerate(calls):
        arguments = json.dumps(args)
        first = {"index": k, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
        yield _sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}]})
        for piece in (arguments[:5], arguments[5:]):
            more = {"index": k, "function": {"arguments": piece}}
            yield _sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [more]}, "finish_reason": None}]})
    yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if calls else "stop"}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        yield _sse({**base, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


# --- responses -----------------------------------------------------------------------------

def _responses_items(text: str, calls: list) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{
        "type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }]
    for cid, name, args in calls:
        items.append({"type": "function_call", "id": f"fc_{cid}", "call_id": cid, "name": name,
                      "arguments": json.dumps(args), "status": "completed"})
    return items


def _response(body: dict[str, Any], output: list, usage: dict[str, Any] | None, status: str) -> dict[str, Any]:
    return {"id": f"resp_{abs(hash(json.dumps(output))) % 10**8}", "object": "response", "created_at": 1,
            "model": body["model"], "status": status, "output": output, "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": body.get("tools") or [], "usage": usage}


def _responses_stream(body: dict[str, Any], text: str, calls: list, usage: dict[str, Any]) -> Iterator[bytes]:
    seq = iter(range(10**6))
    items = _responses_items(text, calls)

    def event(kind: str, **fields: Any) -> bytes:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    yield event("response.created", response=_response(body, [], None, "in_progress"))
    yield event("response.in_progress", response=_response(body, [], None, "in_progress"))
    for index, item in enumerate(items):
        if item["type"] == "message":
            yield event("response.output_item.added", output_index=index, item={**item, "content": [], "status": "in_progress"})
            part = {"type": "output_text", "text": "", "annotations": []}
            yield event("response.content_part.added", output_index=index, item_id=item["id"], content_index=0, part=part)
            yield event("response.output_text.delta", output_index=index, item_id=item["id"], content_index=0, delta=text)
            yield event("response.output_text.done", output_index=index, item_id=item["id"], content_index=0, text=text)
            yield event("response.content_part.done", output_index=index, item_id=item["id"], content_index=0,
                        part={**part, "text": text})
        else:
            yield event("response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"})
            yield event("response.function_call_arguments.delta", output_index=index, item_id=item["id"], delta=item["arguments"])
            yield event("response.function_call_arguments.done", output_index=index, item_id=item["id"], arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
    yield event("response.completed", response=_response(body, items, usage, "completed"))


# --- messages ------------------------------------------------------------------------------

def _messages_blocks(text: str, calls: list) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}, *({"type": "tool_use", "id": cid, "name": name, "input": args} for cid, name, args in calls)]


def _message(body: dict[str, Any], blocks: list, usage: dict[str, Any], stop: str | None) -> dict[str, Any]:
    return {"id": "msg_scripted", "type": "message", "role": "assistant", "model": body["model"], "content": blocks,
            "stop_reason": stop, "stop_sequence": None, "usage": usage}


def _messages_stream(body: dict[str, Any], text: str, calls: list, usage: dict[str, Any]) -> Iterator[bytes]:
    start_usage = {"input_tokens": usage["input_tokens"], "output_tokens": 1}
    yield _sse({"type": "message_start", "message": _message(body, [], start_usage, None)}, event="message_start")
    for index, block in enumerate(_messages_blocks(text, calls)):
        if block["type"] == "text":
            yield _sse({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}, "content_block_start")
            yield _sse({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}, "content_block_delta")
        else:
            yield _sse({"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}}, "content_block_start")
            partial = json.dumps(block["input"])
            for piece in (partial[:4], partial[4:]):
                yield _sse({"type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece}}, "content_block_delta")
        yield _sse({"type": "content_block_stop", "index": index}, "content_block_stop")
        yield _sse({"type": "ping"}, "ping")
    yield _sse({"type": "message_delta", "delta": {"stop_reason": "tool_use" if calls else "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": COMPLETION_TOKENS}}, "message_delta")
    yield _sse({"type": "message_stop"}, "message_stop")


async def _answer(request: Request, api: str) -> Response:
    raw = await request.body()
    body = json.loads(raw)
    text, calls = decide(api, body)
    usage = _usage(api, raw)
    if body.get("stream"):
        stream = {"chat": _chat_stream, "responses": _responses_stream, "messages": _messages_stream}[api]
        return StreamingResponse(stream(body, text, calls, usage), media_type="text/event-stream")
    if api == "chat":
        return JSONResponse(_chat_whole(body, text, calls, usage))
    if api == "responses":
        return JSONResponse(_response(body, _responses_items(text, calls), usage, "completed"))
    return JSONResponse(_message(body, _messages_blocks(text, calls), usage, "tool_use" if calls else "end_turn"))


async def chat(request: Request) -> Response:
    return await _answer(request, "chat")


async def responses(request: Request) -> Response:
    return await _answer(request, "responses")


async def messages(request: Request) -> Response:
    return await _answer(request, "messages")


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model", "created": 1, "owned_by": "tests"}]})


app = Starlette(routes=[
    Route("/v1/chat/completions", chat, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
