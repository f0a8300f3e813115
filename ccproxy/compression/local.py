"""``ccproxy.compress``: the Gateway's compression, in-process, with the scorer loaded here."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from ccproxy.compression.gateway import ContextCompressor
from ccproxy.compression.pipeline import Compression
from ccproxy.compression.policy import KeepHint
from ccproxy.compression.scoring import load_scorer
from ccproxy.settings import Settings, get_settings
from ccproxy.tokens import TokenizerCounter


@lru_cache(maxsize=2)
def _compressor(settings: Settings) -> tuple[ContextCompressor, TokenizerCounter]:
    scorer = load_scorer(settings)

    async def score(query: str, units: Sequence[str], hint: KeepHint | None = None) -> list[float]:
        return await asyncio.to_thread(scorer.score, query, list(units), hint)

    # The scorer already holds the scoring model's tokenizer: count with it rather than load
    # the embedded one a second time.
    return ContextCompressor(score, settings), TokenizerCounter(scorer.tokenizer)


async def acompress(
    messages: list[dict[str, Any]],
    *,
    ratio: float | None = None,
    budget: int | None = None,
    settings: Settings | None = None,
) -> Compression:
    compressor, count_tokens = _compressor(settings or get_settings())
    return await compressor.compress_as_asked(messages, count_tokens, ratio=ratio, budget_tokens=budget)


def compress(
    messages: list[dict[str, Any]],
    *,
    ratio: float | None = None,
    budget: int | None = None,
    settings: Settings | None = None,
) -> Compression:
    """Compress chat messages as the proxy would; inside an event loop use ``acompress``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(acompress(messages, ratio=ratio, budget=budget, settings=settings))
    raise RuntimeError("ccproxy.compress() was called inside an event loop; await ccproxy.acompress() instead.")
