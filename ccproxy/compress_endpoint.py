"""``POST /v1/compress``: compression as a service, metered like any other work.

The scoring it asks for costs what a chat request's compression costs, so it is admitted by
the tokens-per-minute limit on the raw count before any scoring, and every answered call
writes a usage event of kind ``compress`` (tokens_before = the tokens it read).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

from fastapi.responses import Response

from ccproxy.auth import Principal
from ccproxy.serving import ChatParts, count_prompt_or_zero, limit_key
from ccproxy.compression.gateway import compress_response
from ccproxy.compression.pipeline import Compression
from ccproxy.limits import RateLimiter
from ccproxy.logs import log_request
from ccproxy.protocol import ProxyError, dumps_bytes, parse_compress_request
from ccproxy.usage.events import UsageEvent, new_event_id

logger = logging.getLogger("ccproxy")

# The model a compress event is recorded under when the caller named none.
UNNAMED_MODEL = "default"


def _figures(compression: Compression, counted: int) -> Compression:
    """A request forwarded untouched (too large) reports the caller's own count, not zeros."""
    if compression.units:
        return compression
    return Compression(compression.forwarded, compression.outcome, counted, counted, ())


async def serve_compress(
    parts: ChatParts, principal: Principal, raw: bytes, request_id: str, limiter: RateLimiter
) -> Response:
    started = time.perf_counter()
    created_at = datetime.now(timezone.utc)
    heavy_work = parts.compressor.heavy_work
    body, asked = await heavy_work(len(raw), parse_compress_request, raw)
    await parts.admit_spending(asked.model, principal)
    counter = await asyncio.to_thread(parts.counter_for, asked.model)
    counted = await heavy_work(len(raw), count_prompt_or_zero, counter, {"messages": body["messages"]})
    key = limit_key(principal)
    limiter.admit_tokens(key, counted)  # before any scoring
    try:
        compression = await parts.compressor.compress_as_asked(
            body["messages"], counter, ratio=asked.ratio, budget_tokens=asked.budget, scope=principal.account_id
        )
    except Exception as exc:
        logger.warning("compress endpoint failed: %s", type(exc).__name__)
        limiter.refund_tokens(key, counted)  # nothing was scored for the caller
        raise ProxyError(
            503,
            "The compressor could not score this request; try again later.",
            type="server_error",
            code="compressor_unavailable",
        ) from None
    compression = _figures(compression, counted)
    elapsed_ms = round((time.perf_counter() - started) * 1000, 3)  # the whole call is compression
    event = UsageEvent(
        event_id=new_event_id(),
        account_id=principal.account_id,
        key_id=principal.key_id,
        model=asked.model or UNNAMED_MODEL,
        tokens_before=compression.tokens_before,
        tokens_after=compression.tokens_after,
        tokens_saved=compression.tokens_saved,
        prompt_tokens=None,
        completion_tokens=None,
        compression=compression.outcome,
        compression_ms=elapsed_ms,
        latency_ms=elapsed_ms,
        status=200,
        stream=False,
        created_at=created_at,
        kind="compress",
    )
    log_request(request_id, event)
    await parts.recorder.record(event)
    # Up to the whole body again, plus a report per unit: encoded in a thread when large.
    content = await heavy_work(len(raw), dumps_bytes, compress_response(compression))
    return Response(content=content, media_type="application/json")
