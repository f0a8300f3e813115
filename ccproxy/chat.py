"""One chat completion through ccproxy: compress, forward, count the tokens, record the usage.

Token accounting: ``saved`` is measured with one tokenizer (the target model's) on the
original and on the compressed prompt. ``after`` is the upstream's own ``prompt_tokens``
whenever it reports one (that is what the provider bills), else our count; ``before`` is
``after + saved``. A streamed answer's headers leave before the upstream's usage exists, so
they carry our counts; the usage event carries the upstream's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fastapi.responses import Response, StreamingResponse

from ccproxy.auth import Principal
from ccproxy.compression.gateway import ContextCompressor
from ccproxy.completion_tally import CompletionTally
from ccproxy.compression.pipeline import Compression
from ccproxy.image_urls import enforce_image_policy
from ccproxy.limits import RateLimiter
from ccproxy.logs import log_request
from ccproxy.metrics import ChatObserver, NoMetrics
from ccproxy.protocol import (
    ChatCompletionRequest,
    CompressionControl,
    ProxyError,
    compression_control,
    error_body,
    parse_chat_request,
    sse_event,
    sse_fields,
)
from ccproxy.spend import SpendGuard, check_model_allowed
from ccproxy.tokens import PromptCounter
from ccproxy.upstream import Upstream, UpstreamReply
from ccproxy.usage.events import UsageEvent, new_event_id
from ccproxy.usage.recorder import UsageRecorder
from ccproxy.usage_tap import UpstreamUsage, caller_asked_for_usage, tap_usage, usage_of_body, with_usage_requested

logger = logging.getLogger("ccproxy")

CLIENT_CLOSED = 499  # nginx's convention for "the caller went away before the answer ended"


@dataclass(frozen=True)
class TokenFigures:
    before: int
    after: int
    saved: int

    def headers(self) -> dict[str, str]:
        kept = self.after / self.before if self.before else 1.0
        return {
            "x-tokens-before": str(self.before),
            "x-tokens-after": str(self.after),
            "x-tokens-saved": str(self.saved),
            "x-compression-ratio": f"{kept:.4f}",
        }


def token_figures(counted_before: int, counted_after: int, upstream_prompt_tokens: int | None) -> TokenFigures:
    saved = counted_before - counted_after
    after = counted_after if upstream_prompt_tokens is None else upstream_prompt_tokens
    return TokenFigures(before=after + saved, after=after, saved=saved)


def tokens_to_settle(counted_after: int, usage: UpstreamUsage | None) -> int:
    """Tokens a finished request still owes its tokens-per-minute bucket: the completion, and
    any prompt tokens the upstream reports beyond the count that was charged up front."""
    if usage is None:
        return 0
    prompt_extra = max(0, (usage.prompt_tokens or 0) - counted_after)
    return (usage.completion_tokens or 0) + prompt_extra


def limit_key(principal: Principal) -> str:
    return principal.key_id or principal.account_id


@dataclass
class ChatParts:
    """What a chat completion needs; the service wires the real ones in."""

    upstream: Upstream
    compressor: ContextCompressor
    counter_for: Callable[[str], PromptCounter]
    recorder: UsageRecorder
    metrics: ChatObserver = field(default_factory=NoMetrics)
    allowed_models: Sequence[str] | None = None  # None: every model (CCPROXY_ALLOWED_MODELS)
    spend_guard: SpendGuard | None = None  # the per-key monthly cap; None: no cap

    async def admit_spending(self, model: str | None, principal: Principal) -> None:
        """The model allow-list and the spend cap: before any scoring or forwarding."""
        if model is not None:
            check_model_allowed(model, self.allowed_models)
        if self.spend_guard is not None:
            await self.spend_guard.acheck(principal.key_id)


@dataclass
class _Ledger:
    """The facts about one request: its usage event, its metrics and its access-log line."""

    parts: ChatParts
    request_id: str
    principal: Principal
    model: str
    family: str
    stream: bool
    compression: str
    compression_ms: float
    counted_before: int
    counted_after: int
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    usage: UpstreamUsage | None = None
    finished: bool = False
    settle: Callable[[int], None] | None = None
    # Set once the upstream accepted the request (its answer started): from then on the
    # provider bills it, whether or not the answer reaches its end.
    upstream_accepted: bool = False
    tally: CompletionTally | None = None  # a stream's completion so far
    count_texts: Callable[[Sequence[str]], list[int]] | None = None

    def figures(self) -> TokenFigures:
        prompt_tokens = self.usage.prompt_tokens if self.usage else None
        return token_figures(self.counted_before, self.counted_after, prompt_tokens)

    def _usage_seen(self) -> UpstreamUsage:
        """An answer without the upstream's usage (a stream cut short, an upstream that does
        not report it): our prompt count, and the streamed completion tokens that reached us."""
        if self.tally is None or self.count_texts is None:
            return UpstreamUsage(None, None)
        return UpstreamUsage(None, self.tally.tokens(self.count_texts))

    def event(self, status: int) -> UsageEvent:
        if self.upstream_accepted and self.usage is None:
            self.usage = self._usage_seen()
        # A request the upstream refused is not billed by it, so it carries no tokens either.
        figures = self.figures() if status < 400 or self.upstream_accepted else TokenFigures(0, 0, 0)
        return UsageEvent(
            event_id=new_event_id(),
            account_id=self.principal.account_id,
            key_id=self.principal.key_id,
            model=self.model,
            tokens_before=figures.before,
            tokens_after=figures.after,
            tokens_saved=figures.saved,
            prompt_tokens=self.usage.prompt_tokens if self.usage else None,
            completion_tokens=self.usage.completion_tokens if self.usage else None,
            cached_tokens=self.usage.cached_tokens if self.usage else None,
            compression=self.compression,
            compression_ms=round(self.compression_ms, 3),
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            status=status,
            stream=self.stream,
            created_at=self.created_at,
        )

    def _close(self, status: int) -> UsageEvent | None:
        if self.finished:
            return None
        self.finished = True
        event = self.event(status)
        self.parts.metrics.finished(
            self.family, status, self.stream, event.latency_ms / 1000,
            event.tokens_before, event.tokens_saved, event.tokens_after,
        )
        log_request(self.request_id, event)
        if self.settle is not None and (status < 400 or self.upstream_accepted):
            self.settle(tokens_to_settle(self.counted_after, self.usage))
        return event

    async def finish(self, status: int) -> None:
        event = self._close(status)
        if event is not None:
            await self.parts.recorder.record(event)

    def finish_now(self, status: int) -> None:
        """For places that cannot await (a stream being torn down)."""
        event = self._close(status)
        if event is not None:
            self.parts.recorder.record_now(event)


async def _compressed(
    parts: ChatParts,
    body: dict[str, Any],
    control: CompressionControl,
    counter: PromptCounter,
    prompt_tokens: int | None,
    account_id: str,
) -> tuple[dict[str, Any], Compression, float]:
    started = time.perf_counter()
    compressor = parts.compressor
    compression = await compressor.compress_or_original(
        body["messages"], compressor.plan(control), counter, prompt_tokens=prompt_tokens, scope=account_id
    )
    elapsed = time.perf_counter() - started
    parts.metrics.compressed(compression.outcome, elapsed)
    if compression.outcome == "compressed":
        return {**body, "messages": compression.forwarded}, compression, elapsed * 1000
    return body, compression, elapsed * 1000


async def _forward(
    parts: ChatParts, body: dict[str, Any], headers: Mapping[str, str], stream: bool, size_hint: int
) -> UpstreamReply:
    started = time.perf_counter()
    try:
        reply = await parts.upstream.chat_completions(body, headers, stream, size_hint)
    except ProxyError:
        parts.metrics.upstream_answered(time.perf_counter() - started, None)
        raise
    parts.metrics.upstream_answered(time.perf_counter() - started, reply.status)
    return reply


def _parse(raw: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    original, chat = parse_chat_request(raw)
    enforce_image_policy(original)  # SSRF: which image URLs an upstream may be asked to fetch
    return original, chat


def count_prompt_or_zero(counter: PromptCounter, body: dict[str, Any]) -> int:
    """Our count, or 0 when the tokenizer cannot read the body (a chat template that rejects a
    role, ``tools`` that are not a list…). Such a body is still forwarded: the upstream is the
    judge of what it accepts, and its ``usage`` then supplies the numbers."""
    try:
        return counter.count_prompt(body)
    except Exception as exc:
        logger.warning("token count failed (%s); counted as 0", type(exc).__name__)
        return 0


async def complete_chat(
    parts: ChatParts,
    principal: Principal,
    headers: Mapping[str, str],
    raw: bytes,
    request_id: str,
    limiter: RateLimiter | None = None,
) -> Response:
    started = time.perf_counter()
    # Parsing, validating and counting are CPU work that grows with the body: a large one runs
    # in a bounded thread, so the event loop keeps serving the worker's other requests.
    heavy_work = parts.compressor.heavy_work
    original, chat = await heavy_work(len(raw), _parse, raw)
    control, without_control = compression_control(headers, original)  # a bad option: 400 now
    await parts.admit_spending(chat.model, principal)
    counter = await asyncio.to_thread(parts.counter_for, chat.model)
    counted_before = await heavy_work(len(raw), count_prompt_or_zero, counter, original)
    key = limit_key(principal)
    if limiter is not None:
        # On the raw count, before any scoring: a key over its limit costs no compression work.
        limiter.admit_tokens(key, counted_before)
    forwarded, compression, compression_ms = await _compressed(
        parts, without_control, control, counter, counted_before or None, principal.account_id
    )
    counted_after = (
        await heavy_work(len(raw), count_prompt_or_zero, counter, forwarded)
        if compression.outcome == "compressed"
        else counted_before
    )
    settle = None
    if limiter is not None:
        limiter.refund_tokens(key, counted_before - counted_after)  # dropped tokens are not sent
        settle = functools.partial(limiter.charge_tokens, key)
    stream = bool(chat.stream)
    ledger = _Ledger(
        parts, request_id, principal, chat.model, counter.name, stream, compression.outcome, compression_ms,
        counted_before, counted_after, started, settle=settle, count_texts=counter,
    )
    caller_asked = caller_asked_for_usage(forwarded)
    if stream:
        forwarded = with_usage_requested(forwarded)
    try:
        reply = await _forward(parts, forwarded, headers, stream, len(raw))
    except ProxyError as exc:
        ledger.upstream_accepted = exc.upstream_accepted
        await ledger.finish(exc.status)
        raise
    compression_header = {"x-compression": compression.outcome}
    ledger.upstream_accepted = reply.status < 400
    if reply.events is None:
        if reply.status == 200:
            ledger.usage = await heavy_work(len(reply.body), usage_of_body, reply.body)
        await ledger.finish(reply.status)
        response = Response(
            content=reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers
        )
        response.headers.update({**compression_header, **ledger.figures().headers()})
        return response
    return StreamingResponse(
        _relay(reply.events, ledger, caller_asked),
        status_code=reply.status,
        media_type="text/event-stream",
        headers={
            **reply.headers,
            **compression_header,
            **ledger.figures().headers(),
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
        },
    )


def _is_done(event: bytes) -> bool:
    return sse_fields(event).get("data") == "[DONE]"


async def _relay(events: AsyncIterator[bytes], ledger: _Ledger, caller_asked: bool) -> AsyncIterator[bytes]:
    """Relays the upstream's events; the usage event is stored before the caller sees [DONE],
    so a caller that saw the end of its answer has its usage recorded."""

    def learn(usage: UpstreamUsage) -> None:
        ledger.usage = usage

    ledger.tally = tally = CompletionTally()
    try:
        async for event in tap_usage(events, caller_asked, learn, tally.feed):
            if _is_done(event):
                await ledger.finish(200)
            yield event
        await ledger.finish(200)  # no-op after [DONE]; an upstream that omits it still answered
    except ProxyError as exc:
        # The status line is already sent: a failure now can only be told inside the stream,
        # which the OpenAI SDKs surface as an APIError.
        logger.warning("upstream stream broke: %s", exc.code)
        ledger.finish_now(exc.status)
        yield sse_event(exc.body())
    except Exception as exc:
        # Our own fault while relaying; told the same way, and logged without the message,
        # which could quote the event being relayed.
        logger.error("relaying the stream failed: %s", type(exc).__name__)
        ledger.finish_now(500)
        yield sse_event(error_body("The server had an error while relaying the answer.", type="server_error"))
    finally:
        ledger.finish_now(CLIENT_CLOSED)  # no-op unless the caller went away mid-stream
