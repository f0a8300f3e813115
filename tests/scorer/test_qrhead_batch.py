"""Batched scoring (issue 18): the windows of several requests in padded forwards give each
prompt the numbers it gets alone, and the scorer makes one batched call where it made one per
window."""

from __future__ import annotations

import pytest
import torch

from ccproxy.compression.model import ScoringModel
from ccproxy.compression.qrhead import QRHeadScorer, batch_token_scores, window_token_scores
from nqdata.items import load_records, random_distractor_items

QUERY = "In which city is the Eiffel Tower?"


@pytest.fixture(scope="module")
def items():
    return random_distractor_items(load_records("eval"), 20, n_items=4, seed=5)


def _eager_reference(model, prompt, layers: list[int]) -> torch.Tensor:
    """[layers x heads, n_context]: calibrated scores from full attention matrices of one
    unpadded prompt (the model's own causal masking)."""
    n_context = len(prompt.context)

    def mean_rows(tail: list[int]) -> torch.Tensor:
        with torch.no_grad():
            out = model(torch.tensor([prompt.context + tail]), output_attentions=True)
        return torch.stack([out.attentions[layer][0, :, n_context:, :n_context].mean(dim=1) for layer in layers])

    model.set_attn_implementation("eager")
    try:
        reference = mean_rows(prompt.query_tail) - mean_rows(prompt.null_tail)
    finally:
        model.set_attn_implementation("sdpa")
    return reference.reshape(-1, n_context)


def test_a_padded_batch_gives_each_prompt_its_own_scores(float32_model: ScoringModel, items) -> None:
    """Contexts and tails of different lengths padded together: each prompt's rows equal the eager
    attention of that prompt alone, so neither the padding nor the implicit causal mask of the
    unmasked context pass leaks into them."""
    model, tokenizer, _ = float32_model
    layers = [2, 7, 13]
    heads_by_layer = {layer: list(range(0, 9, 2)) for layer in layers}
    scorer = QRHeadScorer(model, tokenizer, [(layer, head) for layer, heads in heads_by_layer.items() for head in heads])
    prompts = [
        scorer.build_prompt(items[0].question, items[0].document_texts()[:3]),
        scorer.build_prompt(QUERY + " Please answer with the name of the city and nothing else.",
                            items[1].document_texts()[:1]),
        scorer.build_prompt(items[2].question, items[2].document_texts()[:2]),
    ]
    assert len({len(p.context) for p in prompts}) == 3 and len({len(p.query_tail) for p in prompts}) == 3
    with torch.no_grad():
        batched = batch_token_scores(scorer.decoder, prompts, heads_by_layer, scorer.kv_group)
        alone = [window_token_scores(scorer.decoder, p, heads_by_layer, scorer.kv_group) for p in prompts]
    for prompt, mine, single in zip(prompts, batched, alone):
        reference = _eager_reference(model, prompt, layers)
        wanted = torch.cat([reference[i * scorer.n_heads : (i + 1) * scorer.n_heads][heads_by_layer[layer]]
                            for i, layer in enumerate(layers)])
        assert mine.shape == (len(wanted), len(prompt.context))
        assert torch.allclose(mine, wanted, atol=2e-6)
        assert torch.allclose(mine, single, atol=1e-6)


def test_score_batch_scores_every_window_of_every_request_in_few_forwards(
    float32_model: ScoringModel, shipped_heads, items, monkeypatch
) -> None:
    model, tokenizer, _ = float32_model  # float32: bf16 GEMMs of another shape round differently
    # Small windows: the first request needs several (and a joint window), the others one each.
    scorer = QRHeadScorer(model, tokenizer, shipped_heads, window_tokens=700, overlap_tokens=100,
                          max_batch_tokens=16_384)
    requests = [
        (items[0].question, items[0].document_texts()[:16]),
        (items[1].question, items[1].document_texts()[:4]),
        (items[2].question, items[2].document_texts()[:3]),
        (QUERY, []),
    ]
    singles = [scorer.scored(query, units) for query, units in requests]
    assert singles[0].windows >= 3 and singles[2].windows == 1 and singles[3].ranked == []

    calls: list[int] = []
    real = scorer._batch_token_scores

    def counted(prompts, heads_by_layer):  # type: ignore[no-untyped-def]
        calls.append(len(prompts))
        return real(prompts, heads_by_layer)

    monkeypatch.setattr(scorer, "_batch_token_scores", counted)
    batched = scorer.score_batch([(query, units, None) for query, units in requests])
    # Every window in one padded pass (700-token prompts, 16 k tokens a pass), then the joint
    # windows of the requests that had several.
    assert calls == [sum(s.windows for s in singles), sum(s.windows > 1 for s in singles)]
    for mine, single in zip(batched, singles):
        assert len(mine) == len(single.ranked)
        assert mine == pytest.approx(single.ranked, rel=1e-4, abs=1e-6)


def test_on_a_cpu_each_prompt_runs_alone_by_default(scoring_model: ScoringModel, shipped_heads, monkeypatch) -> None:
    """Padded batches cost more than their prompts one by one on two CPU cores
    (bench/scorer_batch.py); CUDA batches up to MAX_BATCH_TOKENS_CUDA."""
    model, tokenizer, _ = scoring_model
    scorer = QRHeadScorer(model, tokenizer, shipped_heads)
    assert scorer.max_batch_tokens == 0
    calls: list[int] = []
    real = scorer._batch_token_scores
    monkeypatch.setattr(scorer, "_batch_token_scores", lambda prompts, heads: calls.append(len(prompts)) or real(prompts, heads))
    scorer.score_batch([(QUERY, ["Paris is in France.", "Bananas are yellow."]), (QUERY, ["The Eiffel Tower."])])
    assert calls == [1, 1]
