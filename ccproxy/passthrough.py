"""The OpenAI routes ccproxy does not compress, passed through: one SDK client pointed at
ccproxy must not break on its first ``embeddings`` or ``files`` call.

Bytes in, bytes out: the body (JSON or multipart) goes to the upstream as it came, with the
caller's content type; the status, body and relayable headers come back unchanged, a streamed
body (SSE) event by event. Authentication, the per-key request limit, the size limit, the model
allow-list and the spend cap apply as on chat. Where the upstream reports usage in a JSON
answer (embeddings, completions, responses), a usage event of that route's kind is written.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from fastapi.responses import Response, StreamingResponse

from ccproxy.auth import Principal
from ccproxy.serving import ChatParts
from ccproxy.identifiers import MAX_MODEL_CHARS, unsafe_reason
from ccproxy.logs import log_request
from ccproxy.protocol import ProxyError, parse_json_object, sse_event, sse_fields
from ccproxy.upstream import RawCall, UpstreamReply
from ccproxy.usage.events import UsageEvent, new_event_id

logger = logging.getLogger("ccproxy")

# The resources of the OpenAI API below /v1 that are relayed. chat/completions (POST),
# /v1/compress and GET /v1/models have routes of their own, which match first.
PASSTHROUGH_RESOURCES = frozenset(
    {
        "assistants", "audio", "batches", "chat", "completions", "containers", "conversations",
        "embeddings", "evals", "files", "fine_tuning", "images", "models", "moderations",
        "responses", "threads", "uploads", "vector_stores",
    }
)
# With the server's provider key every account shares one provider account: routes that list,
# read or delete stored objects (files, batches, vector stores, stored responses, …) would show
# one account's data to another, and routes that report no usage (audio, images, batches) would
# spend the operator's money unmetered. Only these stateless, metered routes are relayed then.
SERVER_KEY_RESOURCES = frozenset({"embeddings", "moderations"})
# Path segments as OpenAI's ids and names spell them; ".." or an encoded "/" never match.
_SEGMENT = re.compile(r"[A-Za-z0-9_~:@-][A-Za-z0-9._~:@-]*")
MAX_PATH_CHARS = 512


def route_of(path: str) -> str | None:
    """The resource a path below /v1 belongs to, when ccproxy relays it; else None (a 404)."""
    if len(path) > MAX_PATH_CHARS:
        return None
    segments = path.split("/")
    if segments[0] not in PASSTHROUGH_RESOURCES or not all(_SEGMENT.fullmatch(s) for s in segments):
        return None
    return segments[0]


def refused_with_server_key() -> ProxyError:
    return ProxyError(
        403,
        "This route is not relayed while the server holds the provider key: every account would "
        "share one provider account's stored objects and unmetered spend. Relayed then: "
        + ", ".join(f"/v1/{name}" for name in sorted(SERVER_KEY_RESOURCES)) + ".",
        code="route_not_available",
    )


def _model_of(body: bytes, content_type: str | None) -> str | None:
    """The JSON body's ``model``, checked like chat's (it is stored with the usage event)."""
    if not body or not (content_type or "").lower().startswith("application/json"):
        return None
    model = parse_json_object(body).get("model")
    if model is None:
        return None
    if not isinstance(model, str) or unsafe_reason(model, MAX_MODEL_CHARS) is not None:
        raise ProxyError(
            400, f"Invalid value for 'model': must be a string of at most {MAX_MODEL_CHARS} characters "
            "without control characters.", param="model",
        )
    return model


def _count(usage: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def usage_event(
    principal: Principal, kind: str, model: str, reply_body: bytes, latency_ms: float, created_at: datetime,
    stream: bool = False,
) -> UsageEvent | None:
    """The event of an answered call whose JSON (a whole answer, or one streamed event) reports
    ``usage`` (OpenAI's chat-style or the Responses API's names), else None."""
    try:
        answer = orjson.loads(reply_body)
    except ValueError:
        return None
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage, "prompt_tokens", "input_tokens")
    if prompt is None:
        return None
    completion = _count(usage, "completion_tokens", "output_tokens")
    return UsageEvent(
        event_id=new_event_id(), account_id=principal.account_id, key_id=principal.key_id, model=model,
        tokens_before=prompt, tokens_after=prompt, tokens_saved=0, prompt_tokens=prompt,
        completion_tokens=completion, compression="disabled", compression_ms=0.0,
        latency_ms=round(latency_ms, 3), status=200, stream=stream, created_at=created_at, kind=kind,
    )


async def relay(
    parts: ChatParts, principal: Principal, call: RawCall, headers: Mapping[str, str], request_id: str
) -> Response:
    started = time.perf_counter()
    created_at = datetime.now(timezone.utc)
    kind = call.path.split("/")[0]
    heavy_work = parts.compressor.heavy_work
    model = await heavy_work(len(call.body), _model_of, call.body, call.content_type)
    await parts.admit_spending(model, principal)
    reply = await parts.upstream.passthrough(call, headers)
    if reply.events is not None:
        metered = _Metered(parts, principal, kind, model, request_id, started, created_at)
        is_sse = reply.media_type.startswith("text/event-stream") and model is not None
        return StreamingResponse(
            _events(reply.events, metered if is_sse else None), status_code=reply.status,
            media_type=reply.media_type, headers={**reply.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    if reply.status == 200 and model is not None:
        latency_ms = (time.perf_counter() - started) * 1000
        event = await heavy_work(len(reply.body), usage_event, principal, kind, model, reply.body, latency_ms, created_at)
        if event is not None:
            log_request(request_id, event)
            await parts.recorder.record(event)
    return _whole(reply)


def _whole(reply: UpstreamReply) -> Response:
    return Response(content=reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)


@dataclass
class _Metered:
    """A relayed stream's usage: the last event that reported one (a completions stream's usage
    chunk, when the caller asked for it) is written as the call's usage event at its end."""

    parts: ChatParts
    principal: Principal
    kind: str
    model: str | None
    request_id: str
    started: float
    created_at: datetime
    event: UsageEvent | None = None

    def read(self, event: bytes) -> None:
        data = sse_fields(event).get("data")
        if self.model is None or not data or '"usage"' not in data:
            return
        latency_ms = (time.perf_counter() - self.started) * 1000
        found = usage_event(self.principal, self.kind, self.model, data.encode(), latency_ms, self.created_at, True)
        self.event = found or self.event

    def finish(self) -> None:
        if self.event is not None:
            log_request(self.request_id, self.event)
            self.parts.recorder.record_now(self.event)
            self.event = None


async def _events(events: AsyncIterator[bytes], metered: _Metered | None) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            if metered is not None:
                metered.read(event)
            yield event
    except ProxyError as exc:  # the status line is sent: the failure is told inside the stream
        logger.warning("upstream stream broke: %s", exc.code)
        yield sse_event(exc.body())
    finally:
        if metered is not None:
            metered.finish()
