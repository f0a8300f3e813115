"""One conversation through ccproxy, for every API that carries one (chat completions, the
Responses API, Anthropic's Messages API): parse, admit, compress, forward, relay, account.

What differs between the APIs is an ``Api`` (``ccproxy/chat.py``, ``ccproxy/responses/``,
``ccproxy/messages/``): how a body is read, which adapter parses its conversation, where it
is forwarded, and how its answer reports usage, whole or streamed.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Generic, Protocol, TypeVar

from fastapi.responses import Response, StreamingResponse

from ccproxy.auth import Principal
from ccproxy.completion_tally import CompletionTally
from ccproxy.compression.conversation import WireFormat
from ccproxy.compression.gateway import ContextCompressor
from ccproxy.compression.offload import RELEASE_MIN_BYTES, release
from ccproxy.compression.pipeline import Compression, CompressionPlan
from ccproxy.shared.limits import Limiter
from ccproxy.logs import log_request
from ccproxy.lossless.loop import Dialect, RetrieveRounds, Retriever
from ccproxy.lossless.markers import Marking
from ccproxy.metrics import ChatObserver, NoMetrics
from ccproxy.protocol import ProxyError, compression_control
from ccproxy.retrieval import OriginalsStore, shared_store
from ccproxy.spend import SpendGuard, check_model_allowed
from ccproxy.tokens import PromptCounter
from ccproxy.upstream import Upstream, UpstreamReply
from ccproxy.usage.events import UsageEvent, new_event_id
from ccproxy.usage.recorder import UsageRecorder
from ccproxy.usage_tap import UpstreamUsage

logger = logging.getLogger("ccproxy")
P = TypeVar("P")

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


def overhead_header(started: float, compression_ms: float, upstream_ms: float) -> dict[str, str]:
    """``x-ccproxy-overhead-ms``: the time this request spent in ccproxy up to its response
    headers, less the upstream call (to the whole answer, or to a stream's first bytes) and
    compression (segmenting and scoring): parsing, auth, counting, limits, usage, relaying."""
    spent_ms = (time.perf_counter() - started) * 1000
    return {"x-ccproxy-overhead-ms": f"{max(0.0, spent_ms - compression_ms - upstream_ms):.2f}"}


def token_figures(
    counted_before: int, counted_after: int, upstream_prompt_tokens: int | None, retrieval_tokens: int = 0
) -> TokenFigures:
    """``retrieval_tokens``: prompt tokens of lossless mode's extra upstream calls, already in
    ``upstream_prompt_tokens`` (the upstream's sum): they are a cost of compression, so they
    come off ``saved`` (which may then be negative) and are not part of ``before``."""
    saved = counted_before - counted_after
    after = counted_after if upstream_prompt_tokens is None else upstream_prompt_tokens
    before = after - retrieval_tokens + saved
    return TokenFigures(before=before, after=after, saved=before - after)


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
    """What a request needs; the service wires the real ones in."""

    upstream: Upstream
    compressor: ContextCompressor
    counter_for: Callable[[str], PromptCounter]
    recorder: UsageRecorder
    metrics: ChatObserver = field(default_factory=NoMetrics)
    allowed_models: Sequence[str] | None = None  # None: every model (CCPROXY_ALLOWED_MODELS)
    spend_guard: SpendGuard | None = None  # the per-key monthly cap; None: no cap
    # The Messages API's upstream (CCPROXY_ANTHROPIC_UPSTREAM_URL); None: /v1/messages is a 404.
    anthropic: Upstream | None = None
    # /v1/responses translated to chat completions (an upstream without the route).
    responses_bridged: bool = False
    # Lossless and citation modes: the dropped originals, and how many extra upstream calls one
    # request may make to answer ccproxy_retrieve (CCPROXY_RETRIEVE_MAX_ROUNDS).
    store: OriginalsStore = field(default_factory=shared_store)
    retrieve_max_rounds: int = 3

    # A counter already loaded, without loading one (None then): spares a thread hop per request.
    loaded_counter: Callable[[str | None], PromptCounter | None] = lambda model: None

    async def counter(self, model: str | None) -> PromptCounter:
        """The model's token counter: a lookup once loaded; the first load (seconds) in a thread."""
        return self.loaded_counter(model) or await asyncio.to_thread(self.counter_for, model)  # type: ignore[arg-type]

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
    kind: str  # the API: chat, responses, messages
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
    retrieval: RetrieveRounds | None = None  # lossless mode's extra rounds, when it ran

    def figures(self) -> TokenFigures:
        prompt_tokens = self.usage.prompt_tokens if self.usage else None
        extra = self.retrieval.extra_prompt_tokens if self.retrieval and prompt_tokens is not None else 0
        return token_figures(self.counted_before, self.counted_after, prompt_tokens, extra)

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
            kind=self.kind,
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
        if self.retrieval is not None and self.retrieval.calls:
            done = self.retrieval
            self.parts.metrics.retrieved(done.rounds, done.calls - done.missing, done.missing)
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


class StreamTap(Protocol):
    """One streamed answer's reader, per API: it sees every event once, in order."""

    usage: UpstreamUsage | None  # the upstream's usage, once an event carried it
    tally: CompletionTally  # the completion so far, for a stream that ends early

    def read(self, event: bytes) -> tuple[bytes | None, bool]:
        """(what the caller gets, None to drop the event; whether the answer ends with it)"""
        ...


@dataclass(frozen=True)
class ParsedRequest:
    body: dict[str, Any]  # as sent, for forwarding
    model: str
    stream: bool


@dataclass(frozen=True)
class Api(Generic[P]):
    """What differs between the APIs whose conversation ccproxy compresses."""

    kind: str  # the usage event's kind: chat, responses, messages
    parse: Callable[[bytes], ParsedRequest]  # blocking; ProxyError(400) for a bad body
    wire: WireFormat[P]
    payload_of: Callable[[dict[str, Any]], P]  # the conversation's part of a body
    with_payload: Callable[[dict[str, Any], P], dict[str, Any]]
    prompt_body: Callable[[dict[str, Any]], dict[str, Any]]  # the chat view a PromptCounter counts
    forward: Callable[[ChatParts, dict[str, Any], Mapping[str, str], bool, int], Awaitable[UpstreamReply]]
    usage_of_answer: Callable[[bytes], UpstreamUsage | None]  # a whole answer's usage
    stream_tap: Callable[[dict[str, Any]], StreamTap]  # per streamed request, given its forwarded body
    error_event: Callable[[ProxyError], bytes]  # a failure told inside a stream already started
    # The body as forwarded when streaming (chat asks for the usage chunk); identity elsewhere.
    prepare_stream: Callable[[dict[str, Any]], dict[str, Any]] = lambda body: body
    # Lossless mode's tool and loop in this API's shapes (ccproxy/lossless/).
    retrieval: Dialect | None = None


def mode_for(api: Api[Any], plan: CompressionPlan, body: dict[str, Any]) -> CompressionPlan:
    """Lossless mode needs a loop this API can run: without one (or with several choices per
    answer, ``n`` > 1, which one loop cannot continue) its markers point at /v1/retrieve."""
    if plan.mode == "lossless" and (api.retrieval is None or body.get("n") not in (None, 1)):
        return replace(plan, mode="citation")
    return plan


async def _compressed(
    api: Api[Any],
    parts: ChatParts,
    body: dict[str, Any],
    plan: CompressionPlan,
    marking: Marking,
    counter: PromptCounter,
    prompt_tokens: int | None,
    size_hint: int,
) -> tuple[dict[str, Any], Compression[Any], float]:
    started = time.perf_counter()
    compressor = parts.compressor
    compression = await compressor.compress_or_original(
        api.payload_of(body), plan, counter, wire=api.wire, prompt_tokens=prompt_tokens,
        scope=marking.account, size_hint=size_hint, elide=marking,
    )
    elapsed = time.perf_counter() - started
    parts.metrics.compressed(compression.outcome, elapsed)
    if compression.outcome != "compressed":
        return body, compression, elapsed * 1000
    forwarded = api.with_payload(body, compression.forwarded)
    if plan.mode == "lossless" and marking.made and api.retrieval is not None:
        forwarded = api.retrieval.with_tool(forwarded)  # the tool that answers the markers
    return forwarded, compression, elapsed * 1000


def count_prompt_or_zero(counter: PromptCounter, body: dict[str, Any]) -> int:
    """Our count, or 0 when the tokenizer cannot read the body (a chat template that rejects a
    role, ``tools`` that are not a list…). Such a body is still forwarded: the upstream is the
    judge of what it accepts, and its ``usage`` then supplies the numbers."""
    try:
        return counter.count_prompt(body)
    except Exception as exc:
        logger.warning("token count failed (%s); counted as 0", type(exc).__name__)
        return 0


def count_view(api: Api[Any], counter: PromptCounter, body: dict[str, Any]) -> int:
    try:
        view = api.prompt_body(body)
    except Exception as exc:  # a body the chat view cannot express: counted by the upstream
        logger.warning("prompt view failed (%s); counted as 0", type(exc).__name__)
        return 0
    return count_prompt_or_zero(counter, view)


async def serve_conversation(
    api: Api[Any],
    parts: ChatParts,
    principal: Principal,
    headers: Mapping[str, str],
    raw: bytes,
    request_id: str,
    limiter: Limiter | None = None,
    received_at: float | None = None,  # when the request reached ccproxy (auth and body read before this call)
) -> Response:
    started = time.perf_counter()
    received_at = started if received_at is None else received_at
    # Parsing, validating and counting are CPU work that grows with the body: a large one runs
    # in a bounded thread, so the event loop keeps serving the worker's other requests.
    heavy_work = parts.compressor.heavy_work
    request = await heavy_work(len(raw), api.parse, raw)
    control, without_control = compression_control(headers, request.body)  # a bad option: 400 now
    await parts.admit_spending(request.model, principal)
    counter = await parts.counter(request.model)
    counted_before = await heavy_work(len(raw), count_view, api, counter, without_control)
    key = limit_key(principal)
    if limiter is not None:
        # On the raw count, before any scoring: a key over its limit costs no compression work.
        await limiter.aadmit_tokens(key, counted_before)
    plan = mode_for(api, parts.compressor.plan(control), without_control)
    marking = Marking(plan.mode, principal.account_id, parts.store)
    forwarded, compression, compression_ms = await _compressed(
        api, parts, without_control, plan, marking, counter, counted_before or None, len(raw)
    )
    retriever = None
    if compression.outcome == "compressed" and plan.mode == "lossless" and marking.made and api.retrieval is not None:
        retriever = Retriever(api.retrieval, parts.store, principal.account_id, parts.retrieve_max_rounds, RetrieveRounds())
    counted_after = (
        await heavy_work(len(raw), count_view, api, counter, forwarded)
        if compression.outcome == "compressed"
        else counted_before
    )
    settle = None
    if limiter is not None:
        limiter.refund_tokens(key, counted_before - counted_after)  # dropped tokens are not sent
        settle = functools.partial(limiter.charge_tokens, key)
    stream = request.stream
    ledger = _Ledger(
        parts, request_id, principal, request.model, counter.name, api.kind, stream, compression.outcome,
        compression_ms, counted_before, counted_after, started, settle=settle, count_texts=counter,
        retrieval=retriever.done if retriever else None,
    )
    tap = api.stream_tap(forwarded) if stream else None
    if stream:
        forwarded = api.prepare_stream(forwarded)
    upstream_started = time.perf_counter()
    try:
        reply = await _forward(api, parts, forwarded, headers, stream, len(raw), retriever)
    except ProxyError as exc:
        ledger.upstream_accepted = exc.upstream_accepted
        await ledger.finish(exc.status)
        raise
    upstream_ms = (time.perf_counter() - upstream_started) * 1000
    compression_header = {"x-compression": compression.outcome}
    ledger.upstream_accepted = reply.status < 400
    if len(raw) >= RELEASE_MIN_BYTES:  # forwarded: the parsed body is freed off the loop
        await heavy_work(len(raw), release, request.body, without_control, forwarded)
    if reply.events is None or tap is None:
        if reply.status == 200:
            ledger.usage = await heavy_work(len(reply.body), api.usage_of_answer, reply.body)
        await ledger.finish(reply.status)
        response = Response(
            content=reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers
        )
        response.headers.update({**compression_header, **ledger.figures().headers(),
                                 **overhead_header(received_at, compression_ms, upstream_ms)})
        return response
    return StreamingResponse(
        _relay(reply.events, ledger, tap, api.error_event),
        status_code=reply.status,
        media_type="text/event-stream",
        headers={
            **reply.headers,
            **compression_header,
            **ledger.figures().headers(),
            **overhead_header(received_at, compression_ms, upstream_ms),
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
        },
    )


async def _forward(
    api: Api[Any],
    parts: ChatParts,
    body: dict[str, Any],
    headers: Mapping[str, str],
    stream: bool,
    size_hint: int,
    retriever: Retriever | None = None,
) -> UpstreamReply:
    started = time.perf_counter()

    async def send(round_body: dict[str, Any], round_stream: bool) -> UpstreamReply:
        return await api.forward(parts, round_body, headers, round_stream, size_hint)

    try:
        if retriever is None:
            reply = await send(body, stream)
        elif not stream:
            reply = await retriever.answered(send, body)
        else:
            reply = await send(body, True)
            if reply.events is not None:
                reply = replace(reply, events=retriever.spliced(send, body, reply.events))
    except ProxyError:
        parts.metrics.upstream_answered(time.perf_counter() - started, None)
        raise
    parts.metrics.upstream_answered(time.perf_counter() - started, reply.status)
    return reply


async def _relay(
    events: AsyncIterator[bytes], ledger: _Ledger, tap: StreamTap, error_event: Callable[[ProxyError], bytes]
) -> AsyncIterator[bytes]:
    """Relays the upstream's events; the usage event is stored before the caller sees the
    answer's last event, so a caller that saw the end of its answer has its usage recorded."""
    ledger.tally = tap.tally
    try:
        async for event in events:
            relayed, ended = tap.read(event)
            if tap.usage is not None:
                ledger.usage = tap.usage
            if ended:
                await ledger.finish(200)
            if relayed is not None:
                yield relayed
        await ledger.finish(200)  # no-op after the last event; an upstream that omits it still answered
    except ProxyError as exc:
        # The status line is already sent: a failure now can only be told inside the stream,
        # which the SDKs surface as an APIError.
        logger.warning("upstream stream broke: %s", exc.code)
        ledger.finish_now(exc.status)
        yield error_event(exc)
    except Exception as exc:
        # Our own fault while relaying; told the same way, and logged without the message,
        # which could quote the event being relayed.
        logger.error("relaying the stream failed: %s", type(exc).__name__)
        ledger.finish_now(500)
        yield error_event(ProxyError(500, "The server had an error while relaying the answer.", type="server_error"))
    finally:
        ledger.finish_now(CLIENT_CLOSED)  # no-op unless the caller went away mid-stream
