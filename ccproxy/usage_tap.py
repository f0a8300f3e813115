"""Learning the upstream's usage of a request without changing what the caller asked for.

A streamed answer reports usage only when ``stream_options.include_usage`` is set, so
ccproxy always sets it and, when the caller did not ask, removes what it added: the
usage-only last chunk, or a ``usage`` field that rides on a chunk with choices.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ccproxy.protocol import sse_event, sse_fields


@dataclass(frozen=True)
class UpstreamUsage:
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens


def count_of(source: dict[str, Any], name: str) -> int | None:
    """A token count the upstream reported, when it is a sane one."""
    value = source.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_of(payload: Any) -> UpstreamUsage | None:
    """The ``usage`` of a chat completion (or chunk), when it has a sane one."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = count_of(details, "cached_tokens") if isinstance(details, dict) else None
    return UpstreamUsage(count_of(usage, "prompt_tokens"), count_of(usage, "completion_tokens"), cached)


def usage_of_body(body: bytes) -> UpstreamUsage | None:
    try:
        return usage_of(orjson.loads(body))
    except ValueError:  # orjson.JSONDecodeError is one
        return None


def caller_asked_for_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def with_usage_requested(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    return {**body, "stream_options": {**options, "include_usage": True}}


def chunk_of(event: bytes) -> Any:
    """The JSON payload of one SSE event; None for ``[DONE]``, an event without data, or data
    that is not JSON."""
    data = sse_fields(event).get("data")
    if data is None or data == "[DONE]":
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def tap_chunk(event: bytes, chunk: Any, caller_asked: bool) -> tuple[bytes | None, UpstreamUsage | None]:
    """One SSE event and its payload (``chunk_of``) -> (what the caller gets, or None to drop
    it; the usage it carried)."""
    usage = usage_of(chunk)
    if usage is None or caller_asked:
        return event, usage
    if not chunk.get("choices"):
        return None, usage
    return sse_event({k: v for k, v in chunk.items() if k != "usage"}), usage


def tap_event(event: bytes, caller_asked: bool) -> tuple[bytes | None, UpstreamUsage | None]:
    return tap_chunk(event, chunk_of(event), caller_asked)


async def tap_usage(
    events: AsyncIterator[bytes],
    caller_asked: bool,
    on_usage: Callable[[UpstreamUsage], None],
    on_chunk: Callable[[Any], None] = lambda chunk: None,
) -> AsyncIterator[bytes]:
    """The events as the caller gets them; each payload is parsed once, here, and also handed
    to ``on_chunk`` (the completion tally reads the same chunks)."""
    async for event in events:
        chunk = chunk_of(event)
        on_chunk(chunk)
        relayed, usage = tap_chunk(event, chunk, caller_asked)
        if usage is not None:
            on_usage(usage)
        if relayed is not None:
            yield relayed
