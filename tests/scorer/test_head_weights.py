"""Weighted heads (issue 18): a head set file may carry one weight per head; the scorer sums the
heads' token scores times their weights before it scores the units."""

from __future__ import annotations

import json

import pytest
import torch

from ccproxy.compression.heads import head_weights
from ccproxy.compression.model import ScoringModel
from ccproxy.compression.qrhead import QRHeadScorer
from nqdata.items import load_records, random_distractor_items


@pytest.fixture(scope="module")
def item():
    [first] = random_distractor_items(load_records("eval"), 8, n_items=1, seed=11)
    return first.question, list(first.document_texts())


def test_a_head_weighted_zero_counts_for_nothing_and_weights_scale_the_rest(
    float32_model: ScoringModel, shipped_heads, item
) -> None:
    model, tokenizer, _ = float32_model
    question, documents = item
    first, *others = shipped_heads
    alone = QRHeadScorer(model, tokenizer, [first]).scored(question, documents).windowed
    # Given out of order: the weights follow the heads they were given with, not the sorted rows.
    given = [*others[::-1], first]
    weights = [0.0] * len(others) + [2.5]
    zeroed = QRHeadScorer(model, tokenizer, given, head_weights=weights)
    assert zeroed.heads == [first]  # heads of weight 0 are not computed at all
    weighted = zeroed.scored(question, documents).windowed
    assert weighted == pytest.approx([2.5 * x for x in alone], rel=1e-4, abs=1e-7)
    plain = QRHeadScorer(model, tokenizer, shipped_heads).scored(question, documents).windowed
    ones = QRHeadScorer(model, tokenizer, shipped_heads, head_weights=[1.0] * len(shipped_heads))
    assert ones.scored(question, documents).windowed == pytest.approx(plain, rel=1e-5, abs=1e-8)
    assert weighted != pytest.approx(plain, rel=1e-2)  # the weights did change the scores


def test_weights_are_checked_against_the_heads(scoring_model: ScoringModel, shipped_heads) -> None:
    model, tokenizer, _ = scoring_model
    with pytest.raises(ValueError, match="weights for"):
        QRHeadScorer(model, tokenizer, shipped_heads, head_weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        QRHeadScorer(model, tokenizer, shipped_heads, head_weights=[-1.0] + [1.0] * (len(shipped_heads) - 1))
    with pytest.raises(ValueError, match="every head weight is 0"):
        QRHeadScorer(model, tokenizer, shipped_heads, head_weights=[0.0] * len(shipped_heads))
    with pytest.raises(ValueError, match="weights for"):
        head_weights({"model": "m", "heads": [[1, 2], [3, 4]], "weights": [1.0]})
    assert head_weights({"model": "m", "heads": [[1, 2]]}) is None
    assert head_weights(json.loads('{"heads": [[1, 2]], "weights": [0.5]}')) == [0.5]


def test_fitted_weights_put_the_informative_head_first() -> None:
    from training.fit_head_weights import fit_weights

    # Two heads over 200 items of 5 units: head 0 gives the gold unit +1 (with noise), head 1 is
    # noise only, on a 100x larger scale (as raw head scores differ).
    generator = torch.Generator().manual_seed(0)
    gold = torch.randint(0, 5, (200,), generator=generator)
    informative = torch.randn(200, 5, generator=generator) * 0.5
    informative[torch.arange(200), gold] += 1.0
    noise = torch.randn(200, 5, generator=generator) * 100
    weights = fit_weights(torch.stack([informative, noise], dim=1), gold)
    assert weights.min() >= 0 and weights.mean() == pytest.approx(1.0)
    assert weights[0] * informative.std() > 20 * weights[1] * noise.std()


def test_the_shipped_adapter_loads_by_name_with_its_weighted_heads(item) -> None:
    """CCPROXY_SCORING_LORA_PATH=smollm2-hard-lora (docs/TRAINING.md): the Compressor's loader
    wraps the model in the shipped LoRA and scores with the weighted set it was trained for."""
    from ccproxy.compression.heads import head_pairs, read_head_set
    from ccproxy.compression.model import load_scoring_model
    from ccproxy.compression.scoring import load_scorer
    from ccproxy.settings import Settings

    scorer = load_scorer(Settings(scoring_lora_path="smollm2-hard-lora", scoring_mode="qrhead"))
    assert hasattr(scorer.model, "peft_config")
    hard = read_head_set("smollm2-135m-instruct-hard")
    weight_of = dict(zip(head_pairs(hard), hard["weights"]))
    assert scorer.heads == sorted(h for h, w in weight_of.items() if w > 0)  # (14, 3) weighs 0
    assert scorer.head_weights.tolist() == pytest.approx([weight_of[h] for h in scorer.heads])
    question, documents = item
    base = load_scoring_model()
    plain = QRHeadScorer(base.model, base.tokenizer, head_pairs(hard), head_weights=hard["weights"])
    assert scorer.score(question, documents) != pytest.approx(plain.score(question, documents), rel=1e-2)


def test_the_conversational_bench_scores_with_each_adapter_it_is_given(item) -> None:
    """bench.conversational --adapters: one more scorer per adapter, with that adapter on."""
    from bench.conversational import product_scorers

    built = product_scorers(["qrhead"], adapters=["smollm2-hard-lora"])
    assert set(built) == {"qrhead", "qrhead+smollm2-hard-lora"}
    question, documents = item
    plain = built["qrhead"][0](question, documents)
    tuned = built["qrhead+smollm2-hard-lora"][0](question, documents)
    assert tuned != pytest.approx(plain, rel=1e-3)
