"""Compression as the Gateway uses it: server defaults, a time limit, and fail-open.

A failure anywhere in compression (the scorer raised, timed out, was not loaded, ran out of
memory) must never fail the caller's request: the original messages are forwarded instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from ccproxy.adapters import chat as chat_wire
from ccproxy.compression.bounds import SizeCaps, measure
from ccproxy.compression.conversation import WireFormat
from ccproxy.compression.offload import HeavyWork
from ccproxy.compression.pipeline import (
    Compression,
    CompressionPlan,
    Decided,
    Execution,
    Outcome,
    Scorer,
    decide,
    plan_for,
    render_decided,
)
from ccproxy.compression.policy import should_compress
from ccproxy.compression.units import Elide, TooManyUnits
from ccproxy.protocol import CompressionControl
from ccproxy.settings import Settings
from ccproxy.shared.memo import build_memo
from ccproxy.tokens import TokenCounter

P = TypeVar("P")

logger = logging.getLogger("ccproxy.compression")


class ContextCompressor:
    """Compression with the server's settings. The token counter comes with each call: budgets
    are in the tokens of the model the request is for."""

    def __init__(self, score: Scorer, settings: Settings) -> None:
        self._score = score
        self._settings = settings
        # Stable history decisions of the chats this worker has seen (ccproxy.compression.history).
        self.history_memo = build_memo(settings)  # the worker's, or shared in Redis
        self._caps = SizeCaps(
            max_chars=settings.compression_max_chars,
            max_messages=settings.compression_max_messages,
            max_parts=settings.compression_max_parts,
            max_units=settings.compression_max_units,
            max_lines=settings.compression_max_lines,
        )
        # Segmentation and token counting of large requests, in bounded threads (offload.py).
        self.heavy_work = HeavyWork(settings.heavy_work_concurrency, settings.heavy_work_min_chars)

    def plan(self, control: CompressionControl) -> CompressionPlan:
        return plan_for(
            enabled=control.enabled,
            ratio=control.ratio,
            budget_tokens=control.budget_tokens,
            default_enabled=self._settings.compression_enabled,
            default_ratio=self._settings.compression_ratio,
            threshold_tokens=self._settings.compression_threshold_tokens,
            protect_system=self._settings.compression_protect_system,
            tool_result_min_chars=(
                self._settings.compression_tool_result_min_chars if self._settings.compression_agent_steps else None
            ),
            keep_newest_tool_result=self._settings.compression_keep_newest_tool_result,
            mode=control.mode or self._settings.compression_mode,
            partial_units=self._settings.compression_partial_units,
        )

    async def compress(
        self,
        payload: P,
        plan: CompressionPlan,
        count_tokens: TokenCounter,
        *,
        wire: WireFormat[P] = chat_wire.FORMAT,  # type: ignore[assignment]
        prompt_tokens: int | None = None,
        scope: str = "",
        size_hint: int = 0,
        elide: Elide | None = None,
    ) -> Compression[P]:
        """Compress or raise; bounded by the compressor timeout. ``payload`` is the conversation
        in its wire format (chat: the messages list). ``prompt_tokens``, the whole prompt's count
        when the caller has it, lets a prompt under the threshold skip segmentation (its units,
        a part of it, would be under the threshold too). ``scope`` keeps one account's history
        memo apart from another's; ``size_hint`` (the body's bytes) picks a thread for parsing."""
        if not plan.enabled:
            return untouched(payload, "disabled")
        if prompt_tokens is not None and not should_compress(prompt_tokens, plan.threshold_tokens):
            return untouched(payload, "below_threshold")
        if wire.count(payload) > self._caps.max_messages:
            return untouched(payload, "too_large")
        conversation = await self.heavy_work(size_hint, wire.parse, payload)
        size = measure(conversation.turns, self._caps)
        if size.over_cap is not None:
            return untouched(payload, "too_large")
        memo = self.history_memo if self._settings.compression_history == "stable" else None
        size_chars = size.chars
        if self._settings.redis_url is not None:
            # The memo's lookups and the dropped originals kept for lossless markers are then
            # Redis round trips: in a heavy-work thread, never on the event loop.
            size_chars = max(size_chars, self._settings.heavy_work_min_chars)
        execution = Execution(self.heavy_work, size_chars, self._caps.max_units)

        async def work() -> Decided:
            return await decide(
                conversation, plan, count_tokens=count_tokens, score=self._score, execution=execution,
                memo=memo, scope=scope, elide=elide,
            )

        try:
            decided = await asyncio.wait_for(work(), timeout=self._settings.compressor_timeout_s)
        except TooManyUnits:
            return untouched(payload, "too_large")
        return await render_decided(wire, payload, decided, execution)

    async def compress_as_asked(
        self,
        messages: list[dict[str, Any]],
        count_tokens: TokenCounter,
        *,
        ratio: float | None,
        budget_tokens: int | None,
        scope: str = "",
    ) -> Compression[list[dict[str, Any]]]:
        """Compression the caller asked for by name (``/v1/compress``, ``ccproxy.compress``):
        always on, and a failure raises instead of failing open."""
        plan = self.plan(CompressionControl(enabled=True, ratio=ratio, budget_tokens=budget_tokens))
        return await self.compress(messages, plan, count_tokens, scope=scope)

    async def compress_or_original(
        self,
        payload: P,
        plan: CompressionPlan,
        count_tokens: TokenCounter,
        *,
        wire: WireFormat[P] = chat_wire.FORMAT,  # type: ignore[assignment]
        prompt_tokens: int | None = None,
        scope: str = "",
        size_hint: int = 0,
        elide: Elide | None = None,
    ) -> Compression[P]:
        try:
            return await self.compress(
                payload, plan, count_tokens, wire=wire, prompt_tokens=prompt_tokens, scope=scope, size_hint=size_hint,
                elide=elide,
            )
        except Exception as exc:  # fail-open: any failure forwards the original request
            logger.warning("compression failed open: %s", type(exc).__name__)
            return untouched(payload, "failed")


def untouched(payload: P, outcome: Outcome) -> Compression[P]:
    """The request as it came, with why; its token figures are the caller's own counts."""
    return Compression(payload, outcome, 0, 0, ())


def compress_response(compression: Compression, ccr_hashes: Sequence[str] = ()) -> dict[str, Any]:
    """Body of ``POST /v1/compress``. ``compression_ratio`` (after ÷ before; 1.0 when nothing was
    read, as the ``x-compression-ratio`` header) and ``ccr_hashes`` (the retrieval ids of sidecar
    mode's markers) complete the fields LiteLLM's headroom guardrail reads (docs/SIDECAR.md)."""
    before, after = compression.tokens_before, compression.tokens_after
    return {
        "object": "ccproxy.compression",
        "outcome": compression.outcome,
        "messages": compression.forwarded,
        "tokens_before": before,
        "tokens_after": after,
        "tokens_saved": compression.tokens_saved,
        "compression_ratio": round(after / before, 4) if before > 0 else 1.0,
        "ccr_hashes": list(ccr_hashes),
        "units": [unit.as_dict() for unit in compression.units],
    }
