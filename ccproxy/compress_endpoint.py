"""``POST /v1/compress``: compression as a service, metered like any other work; and its sidecar
mode for other gateways, with ``GET /v1/retrieve/{id}`` (docs/SIDECAR.md).

The scoring it asks for costs what a chat request's compression costs, so it is admitted by
the tokens-per-minute limit on the raw count before any scoring, and every answered call
writes a usage event of kind ``compress`` (tokens_before = the tokens it read).

Sidecar mode is the contract of LiteLLM's ``headroom`` guardrail, chosen by the body field it
sends, ``config`` (``{"mode": "ccr"}``). The guardrail sends only the rows it lets a compressor
touch: never the system prompt, the question (the last user message) or an assistant message,
so every row is context and there is no question to score against; and it puts each returned
row back in its original place, so the answer must hold one row per row sent, same roles. So:
each user or tool row's text is compressed (against a fixed, general question), a row is never
dropped, and what a row lost is said by a marker at its end; with ``"mode": "ccr"`` the marker
names an id under which the row's original text stays retrievable for a few minutes, for the
calling account only (``ccproxy.retrieval``), listed in ``ccr_hashes``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from ccproxy.auth import Principal
from ccproxy.compression.conversation import PART_JOINER
from ccproxy.compression.gateway import compress_response
from ccproxy.compression.pipeline import Compression
from ccproxy.shared.limits import Limiter
from ccproxy.logs import log_request
from ccproxy.protocol import CompressRequest, ProxyError, _validated, dumps_bytes
from ccproxy.retrieval import OriginalsStore, shared_store
from ccproxy.serving import ChatParts, count_prompt_or_zero, limit_key
from ccproxy.tokens import TokenCounter
from ccproxy.usage.events import UsageEvent, new_event_id

logger = logging.getLogger("ccproxy")

# The model a compress event is recorded under when the caller named none.
UNNAMED_MODEL = "default"

# Sidecar mode: what the scorer reads as the question, the real one being withheld by the caller.
SIDECAR_QUERY = "Which facts, names, numbers, errors and decisions in the messages above matter most?"
# Tags each row handed to the compressor with its place in the caller's list; never sent back.
_ROW_TAG = "_ccproxy_row"
# Roles whose text sidecar mode shortens: the guardrail sends user and tool rows; assistant rows
# (the model's own words, which it imitates) and system rows are handed back as they came.
_SIDECAR_ROLES = frozenset({"user", "tool", "function"})
RETRIEVAL_ID = re.compile(r"[0-9a-f]{24}")


class SidecarConfig(BaseModel):
    """The ``config`` object of the headroom contract. Its other knobs (``compress_user_messages``,
    ``target_ratio``, …) are Headroom's own and are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    mode: str | None = None  # "ccr": markers carry retrieval ids


class CompressCall(CompressRequest):
    """Body of ``POST /v1/compress``: ccproxy's fields, and the headroom contract's ``config``,
    whose presence (even ``{}``) selects sidecar mode."""

    config: SidecarConfig | None = None


def parse_compress_call(raw: bytes) -> tuple[dict[str, Any], CompressCall]:
    return _validated(raw, CompressCall)


def _figures(compression: Compression, counted: int) -> Compression:
    """A request forwarded untouched (too large) reports the caller's own count, not zeros."""
    if compression.units:
        return compression
    return Compression(compression.forwarded, compression.outcome, counted, counted, ())


async def serve_compress(
    parts: ChatParts, principal: Principal, raw: bytes, request_id: str, limiter: Limiter
) -> Response:
    started = time.perf_counter()
    created_at = datetime.now(timezone.utc)
    heavy_work = parts.compressor.heavy_work
    body, asked = await heavy_work(len(raw), parse_compress_call, raw)
    await parts.admit_spending(asked.model, principal)
    counter = await parts.counter(asked.model)
    counted = await heavy_work(len(raw), count_prompt_or_zero, counter, {"messages": body["messages"]})
    key = limit_key(principal)
    await limiter.aadmit_tokens(key, counted)  # before any scoring
    config = asked.config  # sidecar mode when present
    messages = body["messages"] if config is None else sidecar_view(body["messages"])
    try:
        if messages:
            compression = await parts.compressor.compress_as_asked(
                messages, counter, ratio=asked.ratio, budget_tokens=asked.budget, scope=principal.account_id
            )
        else:  # sidecar mode, and not one row it may shorten
            compression = Compression(messages, "nothing_to_drop", 0, 0, ())
    except Exception as exc:
        logger.warning("compress endpoint failed: %s", type(exc).__name__)
        limiter.refund_tokens(key, counted)  # nothing was scored for the caller
        raise ProxyError(
            503,
            "The compressor could not score this request; try again later.",
            type="server_error",
            code="compressor_unavailable",
        ) from None
    ccr_hashes: list[str] = []
    if config is None:
        compression = _figures(compression, counted)
    else:
        store = shared_store() if config.mode == "ccr" else None
        args = (body["messages"], compression, counter, counted, store, principal.account_id)
        if getattr(store, "remote", False):  # a store in Redis blocks on the network: in a thread
            answer = await asyncio.to_thread(sidecar_answer, *args)
        else:
            answer = await heavy_work(len(raw), sidecar_answer, *args)
        compression, ccr_hashes = answer.compression, answer.ccr_hashes
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
    content = await heavy_work(len(raw), dumps_bytes, compress_response(compression, ccr_hashes))
    return Response(content=content, media_type="application/json")


# --- sidecar mode ------------------------------------------------------------------------------


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def row_text(content: Any) -> str:
    """What a row says: its string, or its text parts joined as the compressor joins them."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return PART_JOINER.join(part["text"] for part in content if _is_text_part(part))
    return ""


def _shortened(row: dict[str, Any]) -> bool:
    """Whether sidecar mode may shorten this row: a user or tool row with text."""
    return row.get("role") in _SIDECAR_ROLES and bool(row_text(row.get("content")))


def sidecar_view(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as the compressor is to see them: every row it may shorten as context (a user
    message, tagged with its place), then the stand-in question. With no such row, nothing."""
    context = [
        {"role": "user", "content": row["content"], _ROW_TAG: i} for i, row in enumerate(rows) if _shortened(row)
    ]
    return [*context, {"role": "user", "content": SIDECAR_QUERY}] if context else []


def marker(omitted_tokens: int, ref: str | None) -> str:
    said = f"[ccproxy: {omitted_tokens} tokens of this message omitted"
    return f"{said}. Retrieve original: hash={ref}]" if ref else f"{said}]"


def _with_marker(kept: Any, original: Any, note: str) -> Any:
    """The row's content as kept (None: nothing kept) with ``note`` after it, in the row's shape."""
    if isinstance(original, str):
        return f"{kept}\n\n{note}" if kept else note
    return [*(kept or []), {"type": "text", "text": note}]


@dataclass(frozen=True)
class SidecarAnswer:
    compression: Compression  # the caller's rows, one per row sent, and their figures
    ccr_hashes: list[str]


def sidecar_answer(
    rows: Sequence[dict[str, Any]],
    compression: Compression,
    count: TokenCounter,
    counted: int,
    store: OriginalsStore | None,
    account: str,
) -> SidecarAnswer:
    """The caller's rows again, each shortened row with its marker, and figures over the rows'
    texts (markers included). ``store``: where originals are kept (``"mode": "ccr"``); None, no ids.
    Blocking (token counting): run it through the compressor's heavy work."""
    units = tuple(unit for unit in compression.units if unit.kind != "query")  # the stand-in question
    if compression.outcome == "too_large":
        return SidecarAnswer(Compression(list(rows), "too_large", counted, counted, ()), [])
    texts = [row_text(row.get("content")) for row in rows]
    if compression.outcome != "compressed":
        before = sum(count(texts))
        return SidecarAnswer(Compression(list(rows), compression.outcome, before, before, units), [])
    kept_rows = {row[_ROW_TAG]: row for row in compression.forwarded if _ROW_TAG in row}
    changed = [
        i for i, row in enumerate(rows)
        if _shortened(row) and (i not in kept_rows or kept_rows[i]["content"] != row["content"])
    ]
    kept_texts = [row_text(kept_rows[i]["content"]) if i in kept_rows else "" for i in changed]
    counts = count([*texts, *kept_texts])
    before_counts, kept_counts = counts[: len(texts)], counts[len(texts):]
    answered = list(rows)
    hashes: list[str] = []
    notes: list[str] = []
    for i, kept_tokens in zip(changed, kept_counts):
        ref = store.put(account, texts[i]) if store is not None else None
        if ref is not None:
            hashes.append(ref)
        note = marker(max(1, before_counts[i] - kept_tokens), ref)
        notes.append(note)
        row = rows[i]
        kept = kept_rows[i]["content"] if i in kept_rows else None
        answered[i] = {**row, "content": _with_marker(kept, row["content"], note)}
    note_counts = count(notes)
    before = sum(before_counts)
    after = before - sum(before_counts[i] for i in changed) + sum(kept_counts) + sum(note_counts)
    return SidecarAnswer(Compression(answered, "compressed", before, after, units), hashes)


# --- GET /v1/retrieve/{id} -------------------------------------------------------------------


def serve_retrieve(principal: Principal, ref: str, store: OriginalsStore | None = None) -> Response:
    """The original text kept under ``ref`` for the caller's account, in the shape the headroom
    guardrail reads (``original_content``); a 404 when it is unknown, expired, evicted or another
    account's (which one is not said, nor is the id quoted back)."""
    text = None
    if RETRIEVAL_ID.fullmatch(ref):
        text = (store or shared_store()).get(principal.account_id, ref)
    if text is None:
        raise ProxyError(
            404,
            "Nothing to retrieve under this id: it is unknown, expired (retrievable for "
            "CCPROXY_RETRIEVAL_TTL_S seconds) or was compressed for another account.",
            code="not_found",
        )
    body = {"object": "ccproxy.retrieval", "hash": ref, "original_content": text}
    return Response(content=dumps_bytes(body), media_type="application/json")
