"""Anthropic's Messages API as ccproxy reads it: the request fields it must understand, errors
in Anthropic's shape, the ``usage`` of an answer and of a streamed one.

Lenient like chat's: only ``model``, ``messages``, ``system`` and ``stream`` are checked; every
other field (``max_tokens``, ``tools``, ``thinking``, ``cache_control`` …) is forwarded untouched,
for the upstream to judge.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ccproxy.completion_tally import CompletionTally
from ccproxy.identifiers import ModelName
from ccproxy.protocol import ProxyError, parse_json_object, sse_event, validated_fields
from ccproxy.usage_tap import UpstreamUsage, chunk_of, count_of

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_DELTA_TEXTS = ("text", "partial_json", "thinking")


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    error_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_body_of(exc: ProxyError) -> dict[str, Any]:
    return anthropic_error_body(exc.status, exc.message)


def error_event(exc: ProxyError) -> bytes:
    return sse_event(error_body_of(exc), event="error")


class MessagesRequest(BaseModel):
    """The fields ccproxy reads; ``messages`` is checked apart (it may hold many)."""

    model_config = ConfigDict(extra="allow")

    model: ModelName = Field(min_length=1)
    stream: StrictBool | None = False


def parse_messages_request(raw: bytes) -> tuple[dict[str, Any], MessagesRequest]:
    body = parse_json_object(raw)
    request = validated_fields(MessagesRequest, body, apart="messages")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProxyError(400, "messages: Field required (a non-empty list)", param="messages")
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise ProxyError(400, f"messages.{k}: must be an object with role 'user' or 'assistant'", param=f"messages.{k}")
        content = message.get("content")
        if not (isinstance(content, str) or (isinstance(content, list) and all(isinstance(b, dict) for b in content))):
            raise ProxyError(400, f"messages.{k}.content: must be a string or a list of content blocks", param=f"messages.{k}.content")
    system = body.get("system")
    if system is not None and not (isinstance(system, str) or (isinstance(system, list) and all(isinstance(b, dict) for b in system))):
        raise ProxyError(400, "system: must be a string or a list of text blocks", param="system")
    return body, request


def usage_of_message(usage: Any, earlier: UpstreamUsage | None = None) -> UpstreamUsage | None:
    """A Messages ``usage``: the prompt is every input token the upstream processed (uncached,
    read from its cache and written to it), cached = read from its cache. A stream's
    ``message_delta`` reports output tokens (and sometimes input) on top of ``message_start``'s."""
    if not isinstance(usage, dict):
        return earlier
    parts = [count_of(usage, name) for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
    prompt = sum(n for n in parts if n is not None) if parts[0] is not None else None
    completion = count_of(usage, "output_tokens")
    cached = parts[2]
    if earlier is not None:
        prompt = earlier.prompt_tokens if prompt is None else prompt
        completion = earlier.completion_tokens if completion is None else completion
        cached = earlier.cached_tokens if cached is None else cached
    return UpstreamUsage(prompt, completion, cached)


def usage_of_answer(body: bytes) -> UpstreamUsage | None:
    try:
        answer = orjson.loads(body)
    except ValueError:
        return None
    return usage_of_message(answer.get("usage")) if isinstance(answer, dict) else None


class MessagesStreamTap:
    """``message_start`` … ``message_stop``, relayed as they are; usage from ``message_start``
    and ``message_delta``, the end at ``message_stop``."""

    def __init__(self) -> None:
        self.usage: UpstreamUsage | None = None
        self.tally = CompletionTally()

    def read(self, event: bytes) -> tuple[bytes | None, bool]:
        payload = chunk_of(event)  # the event's JSON, parsed once; None when it has none
        kind = payload.get("type") if isinstance(payload, dict) else None
        if kind == "message_start" and isinstance(payload.get("message"), dict):
            self.usage = usage_of_message(payload["message"].get("usage"))
        elif kind == "message_delta":
            self.usage = usage_of_message(payload.get("usage"), self.usage)
        elif kind == "content_block_delta" and isinstance(payload.get("delta"), dict):
            delta = payload["delta"]
            for name in _DELTA_TEXTS:
                if isinstance(delta.get(name), str):
                    self.tally.feed_text(delta[name])
        return event, kind == "message_stop"
