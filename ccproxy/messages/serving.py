"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API as
``serving`` runs it, against the Anthropic upstream (CCPROXY_ANTHROPIC_UPSTREAM_URL). Tool
results and older turns are compressed as units (``ccproxy/adapters/messages.py``); whatever
lies at or before the client's last cache breakpoint is forwarded as sent."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from fastapi.responses import Response

from ccproxy.adapters import messages as messages_wire
from ccproxy.auth import Principal
from ccproxy.lossless.markers import Marking
from ccproxy.lossless.messages import MessagesDialect
from ccproxy.messages.protocol import MessagesStreamTap, error_event, parse_messages_request, usage_of_answer
from ccproxy.protocol import ProxyError, compression_control
from ccproxy.serving import Api, ChatParts, ParsedRequest, count_view, mode_for
from ccproxy.upstream import Upstream, UpstreamReply


def _parse(raw: bytes) -> ParsedRequest:
    body, request = parse_messages_request(raw)
    return ParsedRequest(body, request.model, bool(request.stream))


def anthropic_upstream(parts: ChatParts) -> Upstream:
    if parts.anthropic is None:
        raise ProxyError(
            404, "The Messages API is not configured on this server: set CCPROXY_ANTHROPIC_UPSTREAM_URL.",
            code="not_found",
        )
    return parts.anthropic


async def _forward(
    parts: ChatParts, body: dict[str, Any], headers: Mapping[str, str], stream: bool, size_hint: int
) -> UpstreamReply:
    return await anthropic_upstream(parts).call("messages", body, headers, stream, size_hint)


MESSAGES: Api[dict[str, Any]] = Api(
    kind="messages",
    parse=_parse,
    wire=messages_wire.FORMAT,
    payload_of=lambda body: body,
    with_payload=lambda body, forwarded: forwarded,
    prompt_body=messages_wire.chat_view,
    forward=_forward,
    usage_of_answer=usage_of_answer,
    stream_tap=lambda body: MessagesStreamTap(),
    error_event=error_event,
    retrieval=MessagesDialect(),
)


async def count_tokens(parts: ChatParts, principal: Principal, headers: Mapping[str, str], raw: bytes) -> Response:
    """The upstream's count of the request as ``/v1/messages`` would forward it (compressed the
    same way), so a client budgeting with it sees what it will be billed. Counting is free at
    Anthropic: no usage event."""
    started = time.perf_counter()
    heavy_work = parts.compressor.heavy_work
    request = await heavy_work(len(raw), _parse, raw)
    control, body = compression_control(headers, request.body)
    await parts.admit_spending(request.model, principal)
    upstream = anthropic_upstream(parts)
    counter = await parts.counter(request.model)
    counted_before = await heavy_work(len(raw), count_view, MESSAGES, counter, body)
    compressor = parts.compressor
    # Compressed exactly as /v1/messages would be, markers and ccproxy's tool included.
    plan = mode_for(MESSAGES, compressor.plan(control), body)
    marking = Marking(plan.mode, principal.account_id, parts.store)
    compression = await compressor.compress_or_original(
        body, plan, counter, wire=messages_wire.FORMAT, prompt_tokens=counted_before or None,
        scope=principal.account_id, size_hint=len(raw), elide=marking,
    )
    forwarded = compression.forwarded
    if plan.mode == "lossless" and marking.made:
        forwarded = MessagesDialect().with_tool(forwarded)
    counted_after = await heavy_work(len(raw), count_view, MESSAGES, counter, forwarded) if forwarded is not body else counted_before
    forwarded = {k: v for k, v in forwarded.items() if k not in ("stream", "max_tokens")}  # not count_tokens fields
    reply = await upstream.call("messages/count_tokens", forwarded, headers, False, len(raw))
    response = Response(content=reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)
    saved = counted_before - counted_after
    response.headers.update({"x-compression": compression.outcome, "x-tokens-saved": str(saved)})
    parts.metrics.compressed(compression.outcome, time.perf_counter() - started)
    return response
