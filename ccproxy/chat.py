"""``POST /v1/chat/completions``: the chat completions API as ``serving`` runs it.

Token accounting: ``saved`` is measured with one tokenizer (the target model's) on the
original and on the compressed prompt. ``after`` is the upstream's own ``prompt_tokens``
whenever it reports one (that is what the provider bills), else our count; ``before`` is
``after + saved``. A streamed answer's headers leave before the upstream's usage exists, so
they carry our counts; the usage event carries the upstream's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ccproxy.adapters import chat as chat_wire
from ccproxy.completion_tally import CompletionTally
from ccproxy.image_urls import enforce_image_policy
from ccproxy.lossless.chat import ChatDialect
from ccproxy.protocol import ProxyError, parse_chat_request, sse_event, sse_fields
from ccproxy.serving import Api, ChatParts, ParsedRequest
from ccproxy.upstream import UpstreamReply
from ccproxy.usage_tap import (
    UpstreamUsage,
    caller_asked_for_usage,
    chunk_of,
    tap_chunk,
    usage_of_body,
    with_usage_requested,
)


def _parse(raw: bytes) -> ParsedRequest:
    original, chat = parse_chat_request(raw)
    enforce_image_policy(original)  # SSRF: which image URLs an upstream may be asked to fetch
    return ParsedRequest(original, chat.model, bool(chat.stream))


class ChatStreamTap:
    """Chat chunks: usage from the usage chunk ccproxy asked for (removed again when the caller
    did not ask for it), the end at ``[DONE]``."""

    def __init__(self, caller_asked: bool) -> None:
        self.caller_asked = caller_asked
        self.usage: UpstreamUsage | None = None
        self.tally = CompletionTally()

    def read(self, event: bytes) -> tuple[bytes | None, bool]:
        chunk = chunk_of(event)  # parsed once; the tally reads the same payload
        self.tally.feed(chunk)
        relayed, usage = tap_chunk(event, chunk, self.caller_asked)
        if usage is not None:
            self.usage = usage
        return relayed, chunk is None and sse_fields(event).get("data") == "[DONE]"


async def _forward(
    parts: ChatParts, body: dict[str, Any], headers: Mapping[str, str], stream: bool, size_hint: int
) -> UpstreamReply:
    return await parts.upstream.chat_completions(body, headers, stream, size_hint)


def _error_event(exc: ProxyError) -> bytes:
    return sse_event(exc.body())


CHAT: Api[list[dict[str, Any]]] = Api(
    kind="chat",
    parse=_parse,
    wire=chat_wire.FORMAT,  # type: ignore[arg-type]
    payload_of=lambda body: body["messages"],
    with_payload=lambda body, messages: {**body, "messages": messages},
    prompt_body=lambda body: body,
    forward=_forward,
    usage_of_answer=usage_of_body,
    stream_tap=lambda body: ChatStreamTap(caller_asked_for_usage(body)),
    error_event=_error_event,
    prepare_stream=with_usage_requested,
    retrieval=ChatDialect(),
)

