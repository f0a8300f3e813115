"""The scorer as a deployable part: which model, which heads, and the Compressor's API types."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from ccproxy.settings import Settings


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


def load_scorer(settings: Settings):  # -> QRHeadScorer; torch is imported only here
    import torch

    if settings.compressor_threads:
        torch.set_num_threads(settings.compressor_threads)

    from ccproxy.compression.heads import load_head_set
    from ccproxy.compression.model import load_scoring_model
    from ccproxy.compression.qrhead import QRHeadScorer

    loaded = load_scoring_model(
        scoring_source(settings, torch.cuda.is_available()),
        adapter=str(settings.scoring_lora_path) if settings.scoring_lora_path else None,
        cache_dir=settings.model_cache_dir,
    )
    heads = load_head_set(settings.scoring_head_set or loaded.name)
    return QRHeadScorer(loaded.model, loaded.tokenizer, heads)


def score_requests(scorer, requests: Sequence[ScoreRequest]) -> list[list[float]]:
    return scorer.score_batch([(request.query, request.units) for request in requests])
