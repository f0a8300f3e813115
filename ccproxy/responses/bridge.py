"""The Responses API (``POST /v1/responses``) bridged onto chat completions.

Upstreams that only speak chat completions (the embedded model, llama-cpp-python's server)
still serve ``client.responses.create(...)``: the request becomes a chat request, and the chat
answer (whole, or streamed chunk by chunk) becomes a Responses ``Response`` or its SSE events.
The Responses API's stateful and hosted features (stored responses, conversations, built-in
tools, background runs) have no chat equivalent, so they are refused with a 400 rather than
silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ccproxy.protocol import ProxyError, dumps_bytes, sse_event
from ccproxy.upstream import UpstreamReply
from ccproxy.usage_tap import chunk_of

UNSUPPORTED = "unsupported_on_this_upstream"

# Fields that point at state kept by OpenAI (stored responses, conversations, prompt templates).
_STATEFUL_FIELDS = ("previous_response_id", "conversation", "prompt")
# Chat-only upstreams predate the developer role; for them it is what system was.
_CHAT_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TOOL_CHOICE_WORDS = ("auto", "none", "required")
_IMAGE_DETAILS = ("auto", "low", "high")
_INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _refuse(message: str, param: str) -> ProxyError:
    return ProxyError(400, message, param=param, code=UNSUPPORTED)


def _invalid(message: str, param: str) -> ProxyError:
    return ProxyError(400, message, param=param)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- request: Responses -> chat completions ---------------------------------------------------


def chat_request_from_responses(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the equivalent chat-completions body; ProxyError(400) for what
    a chat upstream cannot do. Error messages name fields, never the request's text."""
    for name in _STATEFUL_FIELDS:
        if body.get(name) is not None:
            raise _refuse(f"'{name}' needs state stored by OpenAI; this upstream keeps none.", name)
    if body.get("background"):
        raise _refuse("Background responses are not available on this upstream.", "background")
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("'instructions' must be a string.", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages += _input_messages(body.get("input"))
    if not messages:
        raise _invalid("'input' is required.", "input")

    # ccproxy's own per-request compression options ride along to the chat pipeline.
    chat = {name: body[name] for name in ("model", "temperature", "top_p", "user", "ccproxy") if name in body}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = _chat_tools(body["tools"])
        if body.get("parallel_tool_calls") is not None:  # chat refuses it without tools
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    if body.get("stream") is True:
        # The usage chunk is what response.completed reports as usage.
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _invalid("'input' must be a string or an array of items.", "input")
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if not isinstance(item, dict):
            raise _invalid(f"{param} must be an object.", param)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            _add_tool_call(messages, item, param)
        elif kind == "function_call_output":
            messages.append(_tool_result(item, param))
        elif kind != "reasoning":  # reasoning items are the model's own (often encrypted) state
            raise _refuse(
                f"{param} has an item type this upstream cannot take; it takes messages, "
                "function calls, function call outputs and reasoning items.",
                param,
            )
    return messages


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = _CHAT_ROLES.get(item["role"]) if isinstance(item.get("role"), str) else None
    if role is None:
        raise _invalid(f"{param}.role must be user, system, developer or assistant.", f"{param}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _invalid(f"{param}.content must be a string or an array of parts.", f"{param}.content")
    parts = [_chat_part(part, f"{param}.content[{i}]") for i, part in enumerate(content)]
    if all(part["type"] == "text" for part in parts):
        # Text parts read as their concatenation; many chat templates only take a string.
        return {"role": role, "content": "".join(part["text"] for part in parts)}
    return {"role": role, "content": parts}


def _chat_part(part: Any, param: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "refusal"):
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise _invalid(f"{param} has no text.", param)
        return {"type": "text", "text": text}
    if kind == "input_image":
        if not isinstance(part.get("image_url"), str):
            raise _refuse(f"{param}: images must come as image_url; files by id need OpenAI's file store.", param)
        image: dict[str, Any] = {"url": part["image_url"]}
        if part.get("detail") in _IMAGE_DETAILS:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise _refuse(f"{param}: this content part type is not available on this upstream.", param)


def _add_tool_call(messages: list[dict[str, Any]], item: dict[str, Any], param: str) -> None:
    """A function_call item joins the assistant message just before it (its text, or the calls
    made in the same turn), as chat carries one turn's calls in one message."""
    if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
        raise _invalid(f"{param} needs a call_id and a name.", param)
    arguments = item.get("arguments", "")
    if not isinstance(arguments, str):
        raise _invalid(f"{param}.arguments must be a string.", f"{param}.arguments")
    call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": arguments}}
    if not (messages and messages[-1]["role"] == "assistant"):
        messages.append({"role": "assistant", "content": None})
    messages[-1].setdefault("tool_calls", []).append(call)


def _tool_result(item: dict[str, Any], param: str) -> dict[str, Any]:
    if not isinstance(item.get("call_id"), str):
        raise _invalid(f"{param} needs a call_id.", f"{param}.call_id")
    output = item.get("output")
    if isinstance(output, list):
        parts = [_chat_part(part, f"{param}.output[{i}]") for i, part in enumerate(output)]
        if any(part["type"] != "text" for part in parts):
            raise _refuse(f"{param}: a tool result on this upstream is text only.", f"{param}.output")
        output = "".join(part["text"] for part in parts)
    if not isinstance(output, str):
        raise _invalid(f"{param}.output must be a string or an array of parts.", f"{param}.output")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": output}


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _invalid("'tools' must be an array.", "tools")
    chat_tools = []
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _refuse(f"{param}: this upstream runs function tools only, no built-in tools.", param)
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        chat_tools.append({"type": "function", "function": function})
    return chat_tools


def _chat_tool_choice(choice: Any) -> Any:
    if choice in _TOOL_CHOICE_WORDS:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _refuse("'tool_choice' on this upstream is auto, none, required or one function.", "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _invalid("'text' must be an object.", "text")
    form = text.get("format")
    kind = form.get("type") if isinstance(form, dict) else None
    if form is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {key: form[key] for key in ("name", "schema", "description", "strict") if key in form}
        return {"type": "json_schema", "json_schema": schema}
    raise _refuse("'text.format' on this upstream is text, json_object or json_schema.", "text.format")


# --- answer: chat completion -> Response ------------------------------------------------------


def _outcome(finish_reason: Any) -> tuple[str, dict[str, Any] | None]:
    """(status, incomplete_details) for a chat finish reason. An answer that never said it
    finished may be cut short, so it is incomplete, for no reason the upstream gave."""
    if finish_reason is None:
        return "incomplete", {"reason": None}
    reason = _INCOMPLETE_REASONS.get(finish_reason) if isinstance(finish_reason, str) else None
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def _usage(chat_usage: Any) -> dict[str, Any] | None:
    if not isinstance(chat_usage, dict):
        return None
    prompt = chat_usage.get("prompt_tokens") or 0
    completion = chat_usage.get("completion_tokens") or 0
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        # Chat usage has no cache-write count; the SDK's type requires one.
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": chat_usage.get("total_tokens") or prompt + completion,
    }


def _response(
    request: dict[str, Any],
    *,
    response_id: str,
    created_at: int,
    model: Any,
    output: list[dict[str, Any]],
    status: str,
    incomplete_details: dict[str, Any] | None = None,
    usage: Any = None,
) -> dict[str, Any]:
    """The Response object; request settings are echoed as the Responses API does."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": incomplete_details,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model if isinstance(model, str) else request.get("model"),
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "temperature": request.get("temperature"),
        "top_p": request.get("top_p"),
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "text": {"format": {"type": "text"}, **(request.get("text") or {})},
        "truncation": "disabled",
        "metadata": request.get("metadata") or {},
        "user": request.get("user"),
        "usage": _usage(usage),
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_call(call_id: Any, name: Any, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": _new_id("fc"),
        "type": "function_call",
        "status": status,
        "call_id": call_id if isinstance(call_id, str) else _new_id("call"),
        "name": name if isinstance(name, str) else "",
        "arguments": arguments,
    }


def responses_from_chat(
    answer: dict[str, Any], request: dict[str, Any], *, response_id: str, created_at: int
) -> dict[str, Any]:
    """A whole chat completion as the Response to ``request`` (the Responses request)."""
    choices = answer.get("choices") or [{}]
    message = choices[0].get("message") or {}
    status, incomplete = _outcome(choices[0].get("finish_reason"))
    item_status = "incomplete" if status == "incomplete" else "completed"
    content = []
    if message.get("content"):
        content.append(_text_part(message["content"]))
    if message.get("refusal"):
        content.append({"type": "refusal", "refusal": message["refusal"]})
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        calls.append(_function_call(call.get("id"), function.get("name"), arguments, item_status))
    output = []
    if content or not calls:  # an answer with neither text nor calls is an empty text
        message_item = {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": item_status}
        output.append({**message_item, "content": content or [_text_part("")]})
    output += calls
    return _response(
        request,
        response_id=response_id,
        created_at=created_at,
        model=answer.get("model"),
        output=output,
        status=status,
        incomplete_details=incomplete,
        usage=answer.get("usage"),
    )


# --- stream: chat chunks -> Responses SSE events -----------------------------------------------


class ResponsesEventStream:
    """Chat-completion stream chunks in, Responses SSE events out.

    Items open as their first delta arrives. The text message is done once a tool call starts
    (chat streams text before calls); function calls stay open until the end, so calls
    interleaved by index still land in their own items.
    """

    def __init__(self, request: dict[str, Any], *, response_id: str, created_at: int) -> None:
        self._request = request
        self._id = response_id
        self._created_at = created_at
        self._model: Any = request.get("model")
        self._sequence = 0
        self._output: list[dict[str, Any]] = []  # by output_index
        self._pieces: dict[int, list[str]] = {}  # open items' text or arguments, by output_index
        self._message: int | None = None  # the open message's output_index
        self._calls: dict[int, int] = {}  # chat tool_call index -> output_index
        self._finish_reason: Any = None
        self._usage: Any = None
        self._ended = False

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse_event(data, event=kind)

    def _snapshot(self, status: str, incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
        return _response(
            self._request,
            response_id=self._id,
            created_at=self._created_at,
            model=self._model,
            output=[] if status == "in_progress" else self._output,
            status=status,
            incomplete_details=incomplete,
            usage=self._usage,
        )

    def start(self) -> list[bytes]:
        snapshot = self._snapshot("in_progress")
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        if self._ended:
            return []
        if isinstance(chunk.get("error"), dict):
            # An upstream failure told inside the stream: told the Responses way, and the end.
            self._ended = True
            error = chunk["error"]
            message = error.get("message") if isinstance(error.get("message"), str) else "The upstream failed."
            return [self._event("error", code=error.get("code"), message=message, param=error.get("param"))]
        if isinstance(chunk.get("model"), str):
            self._model = chunk["model"]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        events: list[bytes] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:  # the bridge never asks for n > 1
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> list[bytes]:
        """The last events: open items done, then response.completed (or .incomplete)."""
        if self._ended:
            return []
        self._ended = True
        status, incomplete = _outcome(self._finish_reason)
        item_status = "incomplete" if status == "incomplete" else "completed"
        events = [event for index in sorted(self._pieces) for event in self._close(index, item_status)]
        events.append(self._event(f"response.{status}", response=self._snapshot(status, incomplete)))
        return events

    def _open(self, item: dict[str, Any]) -> tuple[int, bytes]:
        index = len(self._output)
        self._output.append(item)
        self._pieces[index] = []
        return index, self._event("response.output_item.added", output_index=index, item=item)

    def _text(self, delta: str) -> list[bytes]:
        events = []
        if self._message is None:
            item = {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress"}
            self._message, added = self._open({**item, "content": []})
            place = {"item_id": item["id"], "output_index": self._message, "content_index": 0}
            events += [added, self._event("response.content_part.added", **place, part=_text_part(""))]
        place = {"item_id": self._output[self._message]["id"], "output_index": self._message, "content_index": 0}
        self._pieces[self._message].append(delta)
        events.append(self._event("response.output_text.delta", **place, delta=delta, logprobs=[]))
        return events

    def _tool_call(self, call: dict[str, Any]) -> list[bytes]:
        events = []
        function = call.get("function") or {}
        chat_index = call.get("index", 0)
        if chat_index not in self._calls:
            if self._message is not None:
                events += self._close(self._message, "completed")
            item = _function_call(call.get("id"), function.get("name"), "", "in_progress")
            self._calls[chat_index], added = self._open(item)
            events.append(added)
        index = self._calls[chat_index]
        if isinstance(function.get("arguments"), str) and function["arguments"]:
            self._pieces[index].append(function["arguments"])
            place = {"item_id": self._output[index]["id"], "output_index": index, "delta": function["arguments"]}
            events.append(self._event("response.function_call_arguments.delta", **place))
        return events

    def _close(self, index: int, status: str) -> list[bytes]:
        item = self._output[index]
        text = "".join(self._pieces.pop(index))
        item["status"] = status
        place = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            self._message = None
            part = _text_part(text)
            item["content"] = [part]
            events = [
                self._event("response.output_text.done", **place, content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", **place, content_index=0, part=part),
            ]
        else:
            item["arguments"] = text
            events = [self._event("response.function_call_arguments.done", **place, arguments=text)]
        return events + [self._event("response.output_item.done", output_index=index, item=item)]


# --- the adapter ---------------------------------------------------------------------------------


async def bridged(
    call_chat: Callable[[dict[str, Any], bool], Awaitable[UpstreamReply]], body: dict[str, Any], stream: bool
) -> UpstreamReply:
    """One Responses request served by a chat call: ``call_chat(chat_body, stream)``. A failed
    chat answer comes back as it was (already in the OpenAI error shape)."""
    reply = await call_chat(chat_request_from_responses({**body, "stream": stream}), stream)
    if reply.status != 200:
        return reply
    response_id, created_at = _new_id("resp"), int(time.time())
    if reply.events is None:
        try:
            answer = json.loads(reply.body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            message = "The upstream's chat answer could not be read."
            raise ProxyError(502, message, type="upstream_error", code="bad_upstream_answer")
        converted = responses_from_chat(answer, body, response_id=response_id, created_at=created_at)
        return UpstreamReply(status=200, headers=reply.headers, body=dumps_bytes(converted))
    converter = ResponsesEventStream(body, response_id=response_id, created_at=created_at)
    events = _converted(reply.events, converter)
    return UpstreamReply(status=200, headers=reply.headers, media_type="text/event-stream", events=events)


async def _converted(chat_events: AsyncIterator[bytes], converter: ResponsesEventStream) -> AsyncIterator[bytes]:
    try:
        for event in converter.start():
            yield event
        async for raw in chat_events:
            chunk = chunk_of(raw)  # None for [DONE]: the Responses stream has no such marker
            if isinstance(chunk, dict):
                for event in converter.feed(chunk):
                    yield event
        for event in converter.finish():
            yield event
    finally:
        # A caller gone mid-answer must not leave the upstream's stream open.
        aclose = getattr(chat_events, "aclose", None)
        if aclose is not None:
            await aclose()
