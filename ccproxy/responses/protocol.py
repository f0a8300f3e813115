"""The Responses API's wire protocol as ccproxy reads it: the request fields it must understand,
the ``usage`` of an answer, and the end of a streamed one.

Lenient like chat's: only ``model``, ``input``, ``instructions`` and ``stream`` are checked;
every other field is forwarded untouched.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from ccproxy.completion_tally import CompletionTally
from ccproxy.identifiers import EndUserId, ModelName
from ccproxy.protocol import ProxyError, parse_json_object, validated_fields
from ccproxy.usage_tap import UpstreamUsage, chunk_of, count_of

# The events that end a streamed response; each carries the whole response, usage included.
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesRequest(BaseModel):
    """The fields ccproxy reads; ``input`` is checked apart (it may hold many items)."""

    model_config = ConfigDict(extra="allow")

    model: ModelName = Field(min_length=1)
    instructions: StrictStr | None = None
    stream: StrictBool | None = False
    user: EndUserId | None = None


def parse_responses_request(raw: bytes) -> tuple[dict[str, Any], ResponsesRequest]:
    body = parse_json_object(raw)
    request = validated_fields(ResponsesRequest, body, apart="input")
    items = body.get("input")
    if items is None:
        raise ProxyError(400, "Missing required parameter: 'input'.", param="input")
    if not isinstance(items, (str, list)):
        raise ProxyError(400, "Invalid value for 'input': must be a string or an array of items.", param="input")
    if isinstance(items, list):
        for k, item in enumerate(items):
            if not isinstance(item, dict):
                raise ProxyError(400, f"Invalid value for 'input[{k}]': must be an object.", param=f"input[{k}]")
    return body, request


def usage_of_response(response: Any) -> UpstreamUsage | None:
    """A Response object's ``usage`` (input/output tokens, cached input tokens)."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    cached = count_of(details, "cached_tokens") if isinstance(details, dict) else None
    return UpstreamUsage(count_of(usage, "input_tokens"), count_of(usage, "output_tokens"), cached)


def usage_of_answer(body: bytes) -> UpstreamUsage | None:
    try:
        return usage_of_response(orjson.loads(body))
    except ValueError:
        return None


class ResponsesStreamTap:
    """Typed events relayed as they are; usage from the final event's response."""

    def __init__(self) -> None:
        self.usage: UpstreamUsage | None = None
        self.tally = CompletionTally()

    def read(self, event: bytes) -> tuple[bytes | None, bool]:
        payload = chunk_of(event)  # the event's JSON, parsed once; None when it has none
        kind = payload.get("type") if isinstance(payload, dict) else None
        if not isinstance(kind, str):
            return event, False
        if kind.endswith(".delta") and isinstance(payload.get("delta"), str):
            self.tally.feed_text(payload["delta"])  # text, refusal, function-call arguments
        if kind in FINAL_EVENTS:
            self.usage = usage_of_response(payload.get("response"))
            return event, True
        return event, False
