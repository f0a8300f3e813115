"""``POST /v1/responses``: the Responses API as ``serving`` runs it. Input items are compressed
as units (``ccproxy/adapters/responses.py``); the upstream gets the route natively, or bridged
to chat completions when it lacks it (``bridge.py``, CCPROXY_UPSTREAM_RESPONSES)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ccproxy.adapters import responses as responses_wire
from ccproxy.image_urls import enforce_image_policy
from ccproxy.lossless.responses import ResponsesDialect
from ccproxy.protocol import ProxyError, sse_event
from ccproxy.responses.bridge import bridged, chat_request_from_responses
from ccproxy.responses.protocol import ResponsesStreamTap, parse_responses_request, usage_of_answer
from ccproxy.serving import Api, ChatParts, ParsedRequest
from ccproxy.upstream import UpstreamReply


def _parse(raw: bytes) -> ParsedRequest:
    body, request = parse_responses_request(raw)
    items = body.get("input")
    if isinstance(items, list):
        # SSRF: the same rule for image URLs as on chat, over the items' content parts.
        enforce_image_policy({"messages": [item for item in items if isinstance(item.get("content"), list)]})
    return ParsedRequest(body, request.model, bool(request.stream))


async def _forward(
    parts: ChatParts, body: dict[str, Any], headers: Mapping[str, str], stream: bool, size_hint: int
) -> UpstreamReply:
    if not parts.responses_bridged:
        return await parts.upstream.call("responses", body, headers, stream, size_hint)

    async def chat(chat_body: dict[str, Any], chat_stream: bool) -> UpstreamReply:
        return await parts.upstream.chat_completions(chat_body, headers, chat_stream, size_hint)

    return await bridged(chat, body, stream)


def _error_event(exc: ProxyError) -> bytes:
    # The Responses stream's own error event: {"type": "error", "code", "message", "param"}.
    event = {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param, "sequence_number": 0}
    return sse_event(event, event="error")


def _prompt_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat view the prompt counter counts; the bridge's own translation."""
    return chat_request_from_responses({k: v for k, v in body.items() if k not in ("previous_response_id", "conversation", "prompt")})


RESPONSES: Api[dict[str, Any]] = Api(
    kind="responses",
    parse=_parse,
    wire=responses_wire.FORMAT,
    payload_of=lambda body: body,
    with_payload=lambda body, forwarded: forwarded,
    prompt_body=_prompt_body,
    forward=_forward,
    usage_of_answer=usage_of_answer,
    stream_tap=lambda body: ResponsesStreamTap(),
    error_event=_error_event,
    retrieval=ResponsesDialect(),
)
