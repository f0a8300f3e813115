"""QR heads with a dense encoder in front (pre-filter) or beside them (score fusion).

* ``fusion``: both score every unit; ``fusion.fuse`` mixes the two lists. On hard distractors
  (passages that share the question's words and topic) the QR heads of a small model lose gold
  passages that a sentence encoder keeps; the mix keeps those, and the heads still weigh in on
  text the encoder was not trained for (docs/BENCHMARKS.md).
* ``qrhead-prefiltered``: on a context longer than ``prefilter_tokens`` the dense encoder (several times
  cheaper per token) picks the units worth the QR-head pass, up to ``prefilter_tokens``; the rest
  rank below them in dense order. A shorter context goes to the QR heads whole.
* ``fusion-prefiltered`` (the default): the pre-filter, then fusion on the units it kept.

With a ``KeepHint`` (what the policy will keep), the QR-head pass is skipped when it cannot change
the kept set: the pre-filtered units rank above all others, so when they fit the allowance
together their order among themselves decides nothing (at ratio 0.5, every context over about
twice the pre-filter budget). The dense order then stands in for theirs.

Same interface as ``QRHeadScorer``: ``score(query, units, hint)``, ``score_batch(requests)`` and the
``tokenizer`` the in-process compressor counts with. ``EncoderScorer`` is the encoder alone
(``CCPROXY_SCORING_MODE=dense``): no QR model at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

from ccproxy.compression.fusion import FusionMethod, fuse, merge_prefiltered, prefilter
from ccproxy.compression.policy import KeepHint, kept_whatever_the_order

# The CCPROXY_SCORING_MODE values that use both scorers.
DenseMode = Literal["fusion", "qrhead-prefiltered", "fusion-prefiltered"]


class UnitScorer(Protocol):  # QRHeadScorer
    tokenizer: Any

    def score_batch(self, requests: Sequence[tuple[Any, ...]]) -> list[list[float]]: ...


class SimilarityScorer(Protocol):  # DenseEncoder
    def scores_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]: ...


class FusedScorer:
    def __init__(
        self,
        qr: UnitScorer,
        dense: SimilarityScorer,
        mode: DenseMode,
        *,
        method: FusionMethod = "zscore",
        weight: float = 0.5,
        prefilter_tokens: int = 5000,
    ) -> None:
        if mode not in ("fusion", "qrhead-prefiltered", "fusion-prefiltered"):
            raise ValueError(f"unknown mode {mode!r}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be between 0 and 1, got {weight}")
        if prefilter_tokens < 1:
            raise ValueError(f"prefilter_tokens must be >= 1, got {prefilter_tokens}")
        self.qr = qr
        self.dense = dense
        self.mode = mode
        self.method: FusionMethod = method
        self.weight = weight
        self.prefilter_tokens = prefilter_tokens
        self.passes_skipped = 0  # QR-head passes a hint showed could not change the kept set

    @property
    def tokenizer(self) -> Any:
        return self.qr.tokenizer

    def score(self, query: str, units: Sequence[str], hint: KeepHint | None = None) -> list[float]:
        """One relevance score per unit (higher = more relevant to the query)."""
        return self.score_batch([(query, units, hint)])[0]

    def score_batch(self, requests: Sequence[tuple[Any, ...]]) -> list[list[float]]:
        """(query, units) or (query, units, hint) each: one encoder pass over all of them, then one
        batched QR-head pass over the requests that need one (``QRHeadScorer.score_batch``)."""
        dense = self.dense.scores_many([(request[0], request[1]) for request in requests])
        return self.score_batch_with_dense(requests, dense)

    def score_with_dense(
        self, query: str, units: Sequence[str], dense_scores: Sequence[float], hint: KeepHint | None = None
    ) -> list[float]:
        """The rest of ``score`` once the dense scores are known (the benchmark reuses its own)."""
        return self.score_batch_with_dense([(query, units, hint)], [dense_scores])[0]

    def score_batch_with_dense(
        self, requests: Sequence[tuple[Any, ...]], dense: Sequence[Sequence[float]]
    ) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in requests]
        pending: list[tuple[int, list[int]]] = []  # (request, the units its QR pass rescores)
        for r, (request, dense_scores) in enumerate(zip(requests, dense, strict=True)):
            units, hint = request[1], request[2] if len(request) > 2 else None
            if len(dense_scores) != len(units):
                raise ValueError(f"{len(dense_scores)} dense scores for {len(units)} units")
            if hint is not None and len(hint.unit_tokens) != len(units):
                raise ValueError(f"a hint for {len(hint.unit_tokens)} units, {len(units)} to score")
            if not units:
                continue
            kept = self.rescored_units(units, dense_scores)
            if hint is not None and kept_whatever_the_order(hint, kept):
                self.passes_skipped += 1
                out[r] = merge_prefiltered(dense_scores, kept, [dense_scores[i] for i in kept])
            else:
                pending.append((r, kept))
        qr_all = self.qr.score_batch([(requests[r][0], [requests[r][1][i] for i in kept]) for r, kept in pending])
        for (r, kept), qr_scores in zip(pending, qr_all, strict=True):
            dense_scores = dense[r]
            if self.mode in ("fusion", "fusion-prefiltered"):
                qr_scores = fuse(qr_scores, [dense_scores[i] for i in kept], self.method, self.weight)
            out[r] = merge_prefiltered(dense_scores, kept, qr_scores)
        return out

    def rescored_units(self, units: Sequence[str], dense_scores: Sequence[float]) -> list[int]:
        """Indices of the units the QR heads score: all, unless the pre-filter applies."""
        everything = list(range(len(units)))
        if self.mode == "fusion":
            return everything
        costs = self.unit_tokens(units)
        if sum(costs) <= self.prefilter_tokens:
            return everything
        return prefilter(dense_scores, self.prefilter_tokens, costs)

    def unit_tokens(self, units: Sequence[str]) -> list[int]:
        """Unit lengths in the QR model's tokens: what its pass costs and what its window holds."""
        texts = list(units)
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False).input_ids]


class EncoderScorer:
    """The sentence encoder alone (``CCPROXY_SCORING_MODE=dense``): on NQ it keeps what fusion
    keeps at about a ninth of the CPU time (docs/BENCHMARKS.md); the QR model is not loaded, only
    its tokenizer, which the in-process compressor counts with."""

    def __init__(self, dense: SimilarityScorer, tokenizer: Any) -> None:
        self.dense = dense
        self.tokenizer = tokenizer

    def score(self, query: str, units: Sequence[str], hint: KeepHint | None = None) -> list[float]:
        return self.score_batch([(query, units)])[0]

    def score_batch(self, requests: Sequence[tuple[Any, ...]]) -> list[list[float]]:
        """(query, units) or (query, units, hint) each; one encoder pass over all of them."""
        return self.dense.scores_many([(request[0], request[1]) for request in requests])
