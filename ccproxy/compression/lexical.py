"""BM25 over a request's own units: the first, cheapest stage of the scorer on huge contexts.

The sentence encoder reads about 12 k tokens a second on two cores (bf16), so a 177 k-token
context took it ~15 s, most of a scoring call that then went past the 30 s the Gateway waits for
the Compressor: the request went out uncompressed (docs/BENCHMARKS.md, *Scorer cost* and *Huge
contexts*). ``LexicalFirst`` bounds the encoder's
read: past ``max_tokens`` of units, BM25 (linear in the text, pure Python) picks which units
the encoder reads, up to that many tokens, and ranks the rest below them in BM25 order. It
is a cascade, as retrieval systems are built: each stage reads less than the one before and
costs more per token (BM25, then the encoder, then the QR heads on the encoder's best).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from ccproxy.compression.fusion import merge_prefiltered, prefilter

# One run of letters or digits; no alternation, no nesting, so the scan is linear.
_WORD = re.compile(r"\w+")
# Distinct query terms BM25 looks for, at most: a question followed by pasted JSON must not turn
# every word of the JSON into a term (the QR heads cap their query too, at 512 tokens).
MAX_QUERY_TERMS = 512
# Function words that match everywhere and carry no relevance (the usual short English list).
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his i if in into is it its me my no not of on "
    "or our she so that the their them then there these they this to was we were what when where which "
    "who whom why will with you your".split()
)
K1 = 1.2  # term-frequency saturation (Robertson and Zaragoza's usual range, 1.2-2.0)
B = 0.75  # length normalisation


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def query_terms(query: str) -> set[str]:
    terms: set[str] = set()
    for word in _WORD.finditer(query.lower()):
        if word.group() not in STOPWORDS:
            terms.add(word.group())
            if len(terms) >= MAX_QUERY_TERMS:
                break
    return terms


def bm25_scores(query: str, units: Sequence[str]) -> list[float]:
    """Okapi BM25 of each unit for the query, the statistics (IDF, mean length) taken over these
    units alone. No query term (an empty or all-stopword query): every unit scores 0."""
    terms = query_terms(query)
    if not units or not terms:
        return [0.0] * len(units)
    lengths: list[int] = []
    frequencies: list[Counter[str]] = []
    containing: Counter[str] = Counter()
    for unit in units:
        unit_words = words(unit)
        lengths.append(len(unit_words))
        counts = Counter(word for word in unit_words if word in terms)
        frequencies.append(counts)
        containing.update(counts.keys())
    n = len(units)
    mean_length = sum(lengths) / n or 1.0
    idf = {term: math.log(1.0 + (n - df + 0.5) / (df + 0.5)) for term, df in containing.items()}
    scores = []
    for counts, length in zip(frequencies, lengths):
        norm = K1 * (1.0 - B + B * length / mean_length)
        scores.append(math.fsum(idf[t] * c * (K1 + 1.0) / (c + norm) for t, c in counts.items()))
    return scores


class SimilarityScorer(Protocol):  # DenseEncoder
    tokenizer: Any

    def scores_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]: ...


class LexicalFirst:
    """A ``SimilarityScorer`` that reads at most ``max_tokens`` (the encoder's own tokens) of each
    request's units with ``dense``; on a longer context BM25 chooses them (``prefilter``: best
    first, the later unit on a tie, the best always) and every other unit ranks below them in
    BM25 order (``merge_prefiltered``). A context within the cap is scored by ``dense`` alone,
    exactly as before. ``narrowed``: how many requests the cap applied to."""

    def __init__(self, dense: SimilarityScorer, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.dense = dense
        self.max_tokens = max_tokens
        self.narrowed = 0

    @property
    def tokenizer(self) -> Any:
        return self.dense.tokenizer

    def scores_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        plans: list[tuple[list[float], list[int]] | None] = []  # (BM25 scores, kept) where narrowed
        narrowed_requests: list[tuple[str, list[str]]] = []
        for query, units in requests:
            # A WordPiece token covers at least one character: a context of fewer characters
            # than the cap is within it, and needs no count.
            costs = [] if sum(len(unit) for unit in units) <= self.max_tokens else self._costs(units)
            if sum(costs) <= self.max_tokens:
                plans.append(None)
                narrowed_requests.append((query, list(units)))
                continue
            lexical = bm25_scores(query, units)
            kept = prefilter(lexical, self.max_tokens, costs)
            plans.append((lexical, kept))
            narrowed_requests.append((query, [units[i] for i in kept]))
            self.narrowed += 1
        dense = self.dense.scores_many(narrowed_requests)
        return [
            scores if plan is None else merge_prefiltered(plan[0], plan[1], scores)
            for plan, scores in zip(plans, dense, strict=True)
        ]

    def _costs(self, units: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(units), add_special_tokens=False).input_ids]
