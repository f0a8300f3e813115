"""Compression as the Gateway uses it: server defaults, a time limit, and fail-open.

A failure anywhere in compression (the scorer raised, timed out, was not loaded, ran out of
memory) must never fail the caller's request: the original messages are forwarded instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ccproxy.compression.bounds import SizeCaps, measure
from ccproxy.compression.history import HistoryMemo, compress_stable
from ccproxy.compression.offload import HeavyWork
from ccproxy.compression.pipeline import (
    Compression,
    CompressionPlan,
    Execution,
    Outcome,
    Scorer,
    compress_messages,
    plan_for,
)
from ccproxy.compression.policy import should_compress
from ccproxy.compression.units import TooManyUnits
from ccproxy.protocol import CompressionControl
from ccproxy.settings import Settings
from ccproxy.tokens import TokenCounter

logger = logging.getLogger("ccproxy.compression")


class ContextCompressor:
    """Compression with the server's settings. The token counter comes with each call: budgets
    are in the tokens of the model the request is for."""

    def __init__(self, score: Scorer, settings: Settings) -> None:
        self._score = score
        self._settings = settings
        # Stable history decisions of the chats this worker has seen (ccproxy.compression.history).
        self.history_memo = HistoryMemo()
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
        )

    async def compress(
        self,
        messages: list[dict[str, Any]],
        plan: CompressionPlan,
        count_tokens: TokenCounter,
        *,
        prompt_tokens: int | None = None,
        scope: str = "",
    ) -> Compression:
        """Compress or raise; bounded by the compressor timeout. ``prompt_tokens``, the whole
        prompt's count when the caller has it, lets a prompt under the threshold skip
        segmentation (its units, a part of it, would be under the threshold too). ``scope``
        keeps one account's history memo apart from another's."""
        if not plan.enabled:
            return untouched(messages, "disabled")
        if prompt_tokens is not None and not should_compress(prompt_tokens, plan.threshold_tokens):
            return untouched(messages, "below_threshold")
        size = measure(messages, self._caps)
        if size.over_cap is not None:
            return untouched(messages, "too_large")
        execution = Execution(self.heavy_work, size.chars, self._caps.max_units)
        if self._settings.compression_history == "stable":
            work = compress_stable(
                messages, plan, count_tokens=count_tokens, score=self._score, memo=self.history_memo,
                execution=execution, scope=scope,
            )
        else:
            work = compress_messages(messages, plan, count_tokens=count_tokens, score=self._score, execution=execution)
        try:
            return await asyncio.wait_for(work, timeout=self._settings.compressor_timeout_s)
        except TooManyUnits:
            return untouched(messages, "too_large")

    async def compress_as_asked(
        self,
        messages: list[dict[str, Any]],
        count_tokens: TokenCounter,
        *,
        ratio: float | None,
        budget_tokens: int | None,
        scope: str = "",
    ) -> Compression:
        """Compression the caller asked for by name (``/v1/compress``, ``ccproxy.compress``):
        always on, and a failure raises instead of failing open."""
        plan = self.plan(CompressionControl(enabled=True, ratio=ratio, budget_tokens=budget_tokens))
        return await self.compress(messages, plan, count_tokens, scope=scope)

    async def compress_or_original(
        self,
        messages: list[dict[str, Any]],
        plan: CompressionPlan,
        count_tokens: TokenCounter,
        *,
        prompt_tokens: int | None = None,
        scope: str = "",
    ) -> Compression:
        try:
            return await self.compress(messages, plan, count_tokens, prompt_tokens=prompt_tokens, scope=scope)
        except Exception as exc:  # fail-open: any failure forwards the original request
            logger.warning("compression failed open: %s", type(exc).__name__)
            return untouched(messages, "failed")


def untouched(messages: list[dict[str, Any]], outcome: Outcome) -> Compression:
    """The request as it came, with why; its token figures are the caller's own counts."""
    return Compression(messages, outcome, 0, 0, ())


def compress_response(compression: Compression) -> dict[str, Any]:
    """Body of ``POST /v1/compress``."""
    return {
        "object": "ccproxy.compression",
        "outcome": compression.outcome,
        "messages": compression.messages,
        "tokens_before": compression.tokens_before,
        "tokens_after": compression.tokens_after,
        "tokens_saved": compression.tokens_saved,
        "units": [unit.as_dict() for unit in compression.units],
    }
