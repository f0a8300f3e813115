"""The several-source fit of head weights (training/fit_head_weights.py) and the items it reads
from outside ``training`` (training/data.py): padding and equal source weights change nothing
they should not, and each source counts once whatever its size."""

from __future__ import annotations

import json

import pytest
import torch

from ccproxy.compression.model import ScoringModel
from ccproxy.compression.qrhead import QRHeadScorer
from training.data import UnitsItem, read_units_items
from training.detect_heads import ItemScores, score_items
from training.fit_head_weights import fit_weights, head_features, macro_table, mean_qrscore


def test_padding_and_uniform_item_weights_leave_the_fit_unchanged() -> None:
    generator = torch.Generator().manual_seed(1)
    gold = torch.randint(0, 4, (60,), generator=generator)
    features = torch.randn(60, 3, 4, generator=generator)
    features[torch.arange(60), 0, gold] += 1.0
    plain = fit_weights(features, gold)
    # Two padded unit slots that the mask marks: huge values there must not matter.
    padded = torch.cat([features, torch.full((60, 3, 2), 1e3)], dim=2)
    mask = torch.zeros(60, 6, dtype=torch.bool)
    mask[:, :4] = True
    assert torch.allclose(fit_weights(padded, gold, mask=mask), plain, atol=1e-4)
    assert torch.allclose(fit_weights(features, gold, item_weights=torch.full((60,), 7.0)), plain, atol=1e-4)
    # Weight on the items where the noise head 1 happens to favour the gold: it gains weight.
    helped = (features[torch.arange(60), 1, gold] > features[:, 1].mean(dim=1)).float()
    assert fit_weights(features, gold, item_weights=helped + 1e-3)[1] > plain[1] + 0.1


def item(gold: int, n_units: int, gold_score: float) -> ItemScores:
    """One head (1 layer x 1 head) giving ``gold_score`` per token to the gold unit, 0.1 elsewhere."""
    spans = [(2 * u, 2 * u + 2) for u in range(n_units)]
    tokens = torch.full((1, 2 * n_units), 0.1)
    tokens[0, 2 * gold : 2 * gold + 2] = gold_score
    return ItemScores(gold, spans, tokens.half())


def test_items_of_different_sizes_pad_and_each_source_counts_once() -> None:
    features, gold, mask = head_features([item(0, 3, 0.5), item(4, 5, 0.5)], [(0, 0)], n_heads=1)
    assert features.shape == (2, 1, 5) and gold.tolist() == [0, 4]
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
    # Nine items where the head finds the gold strongly, one where it barely does: the second
    # source counts as much as the first, so the mean is halfway between the sources' means.
    strong = [item(0, 4, 0.9) for _ in range(9)]
    weak = [item(1, 4, 0.2)]
    per_source = [float(mean_qrscore({"s": s}, 1, 1)) for s in (strong, weak)]
    assert float(mean_qrscore({"strong": strong, "weak": weak}, 1, 1)) == pytest.approx(sum(per_source) / 2)


def test_macro_table_averages_each_metric_over_the_sources() -> None:
    row = {"deepest_layer": 15, "n_heads": 4}
    tables = {"hard": {"set": {**row, "top1": 0.9, "top4": 1.0, "mrr": 0.95}},
              "traces": {"set": {**row, "top1": 0.5, "top4": 0.8, "mrr": 0.6}}}
    assert macro_table(tables) == {"set": {**row, "top1": 0.7, "top4": 0.9, "mrr": 0.775}}


def test_units_items_are_read_and_a_gold_outside_the_units_is_refused() -> None:
    text = json.dumps({"source": "two traces", "items": [
        {"question": "q?", "units": ["a", "b"], "gold": 1, "kind": "coding"},
        {"question": "r?", "units": ["c"], "gold": 0},
    ]})
    source, items = read_units_items(text)
    assert source == "two traces" and [i.document_texts() for i in items] == [["a", "b"], ["c"]]
    assert [(i.gold_index, i.kind) for i in items] == [(1, "coding"), (0, "")]
    with pytest.raises(ValueError, match="gold 2 is not one of its 2 units"):
        read_units_items(json.dumps({"items": [{"question": "q", "units": ["a", "b"], "gold": 2}]}))


def test_a_shallow_scoring_is_the_first_layers_of_a_full_one(scoring_model: ScoringModel) -> None:
    """``--max-layer``: the forward stops after that layer, and its rows are the full run's first
    rows (same layers, same heads, same order), so a shallow cache serves a shallow search."""
    scorer = QRHeadScorer(scoring_model.model, scoring_model.tokenizer, [(7, 7)], window_tokens=2000)
    units = ("The Eiffel Tower is in Paris, France.", "Mount Everest is 8,849 metres high.",
             "The Danube flows through Vienna and Budapest.")
    item = UnitsItem("How high is Mount Everest?", units, 1, "test")
    [full] = score_items(scorer, [item], "full")
    [shallow] = score_items(scorer, [item], "shallow", max_layer=3)
    assert full.tokens.shape[0] == scorer.n_layers * scorer.n_heads
    assert shallow.tokens.shape == (4 * scorer.n_heads, full.tokens.shape[1])
    assert shallow.spans == full.spans and shallow.gold == full.gold
    assert torch.allclose(shallow.tokens.float(), full.tokens[: 4 * scorer.n_heads].float(), atol=1e-3)
