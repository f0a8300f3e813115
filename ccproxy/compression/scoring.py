"""The scorer as a deployable part: which model, which heads, and the Compressor's API types."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydantic import BaseModel

from ccproxy.settings import Settings

log = logging.getLogger(__name__)


class ScoreRequest(BaseModel):
    """One request to score: the query and the texts of the droppable units, in order."""

    query: str
    units: list[str]


def scoring_source(settings: Settings, cuda_available: bool) -> str | None:
    """The model to score with: the configured one, else Mistral on a GPU, else the embedded one."""
    from ccproxy.compression.model import PRODUCTION_MODEL

    if settings.scoring_model:
        return settings.scoring_model
    return PRODUCTION_MODEL if cuda_available else None


def load_scorer(settings: Settings):  # -> QRHeadScorer | FusedScorer; torch is imported only here
    import torch

    if settings.compressor_threads:
        torch.set_num_threads(settings.compressor_threads)

    from ccproxy.compression.heads import load_head_set, scoring_head_set
    from ccproxy.compression.model import load_scoring_model
    from ccproxy.compression.qrhead import QRHeadScorer

    adapter = str(settings.scoring_lora_path) if settings.scoring_lora_path else None
    loaded = load_scoring_model(
        scoring_source(settings, torch.cuda.is_available()), adapter=adapter, cache_dir=settings.model_cache_dir
    )
    if settings.scoring_head_set:
        heads = load_head_set(settings.scoring_head_set)
    else:
        heads = scoring_head_set(loaded.name, adapter)
    qr = QRHeadScorer(loaded.model, loaded.tokenizer, heads)
    if settings.scoring_dense == "off":
        return qr
    from ccproxy.compression.dense import DenseModelMissing

    try:
        return fused_scorer(qr, settings)
    except DenseModelMissing as error:
        # A missing optional wheel must not keep the proxy from serving: the QR heads alone
        # still compress, only less well on hard distractors (docs/BENCHMARKS.md).
        log.warning("CCPROXY_SCORING_DENSE=%s, but %s; scoring with the QR heads alone",
                    settings.scoring_dense, error)
        return qr


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
        dense,
        settings.scoring_dense,
        method=settings.scoring_fusion_method,
        weight=settings.scoring_fusion_weight,
        prefilter_tokens=settings.scoring_prefilter_tokens,
    )


def score_requests(scorer, requests: Sequence[ScoreRequest]) -> list[list[float]]:
    return scorer.score_batch([(request.query, request.units) for request in requests])
