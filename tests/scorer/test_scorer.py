"""The QR-head scorer on the real embedded model."""

from __future__ import annotations

import pytest
import torch

from ccproxy.compression.model import ScoringModel
from ccproxy.compression.qrhead import QRHeadScorer, joint_candidates, joint_ranking, plan_windows, unit_scores
from ccproxy.compression.scoring import window_options
from ccproxy.settings import Settings
from nqdata.items import load_records, random_distractor_items

UNITS = [
    "The Eiffel Tower is a wrought-iron tower in Paris, France, completed in 1889.",
    "Bananas are elongated, edible fruits; they are rich in potassium.",
    "Mount Everest, on the border of Nepal and China, is Earth's highest mountain.",
    "Python is a programming language created by Guido van Rossum.",
]
QUERY = "In which city is the Eiffel Tower?"


@pytest.fixture(scope="module")
def eval_items():
    return random_distractor_items(load_records("eval"), 20, n_items=5, seed=11)


def test_gold_document_ranks_high_on_evaluation_items(scorer: QRHeadScorer, eval_items) -> None:
    # Measured on these five items (bf16 and float32 alike): gold first four times with at least
    # 2.8x the runner-up's score, second once with 1.7x the third's.
    ranks = []
    for item in eval_items:
        scores = scorer.score(item.question, item.document_texts())
        assert len(scores) == 20
        ranks.append(sum(s > scores[item.gold_index] for s in scores))
    assert all(rank < 2 for rank in ranks), ranks
    assert sum(rank == 0 for rank in ranks) >= 4, ranks


def test_one_score_per_unit_and_edge_cases(scorer: QRHeadScorer) -> None:
    assert scorer.score(QUERY, []) == []
    scores = scorer.score(QUERY, [*UNITS[:2], "", "x"])
    assert len(scores) == 4 and scores[2] == 0.0
    assert scorer.score(QUERY, UNITS).index(max(scorer.score(QUERY, UNITS))) == 0


def test_score_batch_equals_score(scorer: QRHeadScorer, eval_items) -> None:
    requests = [(QUERY, UNITS), (eval_items[0].question, eval_items[0].document_texts()[:6]), (QUERY, UNITS[1:])]
    batched = scorer.score_batch(requests)
    # In the serving dtype: bf16 GEMMs over a padded batch round differently from a lone prompt's
    # (float32 agrees to 1e-6: tests/scorer/test_qrhead_batch.py); the order stays.
    for mine, alone in zip(batched, [scorer.score(query, units) for query, units in requests], strict=True):
        assert mine == pytest.approx(alone, rel=5e-2, abs=2e-3)
        assert mine.index(max(mine)) == alone.index(max(alone))


def _prompt_tokens(scorer: QRHeadScorer, query: str, units: list[str]) -> int:
    prompt = scorer.build_prompt(query, units)
    return len(prompt.context) + len(prompt.query_tail)


def test_windowing_is_single_window_scoring_where_it_fits(float32_model: ScoringModel, shipped_heads, eval_items) -> None:
    # float32: the windows go through the model as one padded batch, whose bf16 GEMMs round
    # differently from a lone prompt's.
    model, tokenizer, _ = float32_model
    item = eval_items[1]
    units = item.document_texts()[:8]
    exact = _prompt_tokens(QRHeadScorer(model, tokenizer, shipped_heads), item.question, units)
    roomy = QRHeadScorer(model, tokenizer, shipped_heads, window_tokens=100_000)
    tight = QRHeadScorer(model, tokenizer, shipped_heads, window_tokens=exact)
    # The whole prompt fits exactly: one window, the same numbers.
    assert tight.score(item.question, units) == roomy.score(item.question, units)
    # One token less: several windows, each scored as a complete single-window prompt.
    small = QRHeadScorer(model, tokenizer, shipped_heads, window_tokens=exact // 3, overlap_tokens=150)
    unit_ids = small._encode_units(units)
    fixed = exact - sum(len(ids) + len(small.pieces.separator) for ids in unit_ids)
    windows = plan_windows([len(ids) + len(small.pieces.separator) for ids in unit_ids],
                           small.window_tokens - fixed, small.overlap_tokens)
    assert len(windows) >= 3 and any(a.stop > b.start for a, b in zip(windows, windows[1:]))
    total, count = [0.0] * len(units), [0] * len(units)
    for window in windows:
        for k, score in zip(window, roomy.score(item.question, [units[k] for k in window])):
            total[k] += score
            count[k] += 1
    expected = [t / c for t, c in zip(total, count)]
    scored = small.scored(item.question, units)
    assert scored.windows == len(windows)
    assert scored.windowed == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # Then one joint window over each window's best: those rank by their single-window score.
    local = []
    for window in windows:
        local.append((window, roomy.score(item.question, [units[k] for k in window])))
    costs = [len(ids) + len(small.pieces.separator) for ids in unit_ids]
    candidates = joint_candidates(local, costs, small.window_tokens - fixed)
    assert 1 < len(candidates) < len(units)
    joint = roomy.score(item.question, [units[k] for k in candidates])
    assert scored.ranked == pytest.approx(joint_ranking(scored.windowed, candidates, joint), rel=1e-4, abs=1e-6)
    assert small.score(item.question, units) == scored.ranked


def _eager_reference(model, prompt, layers: list[int]) -> torch.Tensor:
    """Calibrated per-head token scores from full attention matrices (the slow, obvious way)."""
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
    return reference  # [layers, heads, n_context]


def test_the_window_settings_plan_the_windows(scoring_model: ScoringModel, shipped_heads, eval_items) -> None:
    """CCPROXY_SCORING_WINDOW_TOKENS / _OVERLAP_TOKENS reach the scorer: the 20 documents (~2.6 k
    tokens) that fit one default window take several 1,024-token windows sharing no unit, and
    every window's prompt fits its size."""
    item = eval_items[0]
    units = item.document_texts()
    default = QRHeadScorer(scoring_model.model, scoring_model.tokenizer, shipped_heads, **window_options(Settings()))
    assert len(default._plan(item.question, units).windows) == 1
    small = QRHeadScorer(scoring_model.model, scoring_model.tokenizer, shipped_heads, **window_options(
        Settings(scoring_window_tokens=1024, scoring_window_overlap_tokens=0)))
    plan = small._plan(item.question, units)
    assert len(plan.windows) >= 3
    assert all(a.stop == b.start for a, b in zip(plan.windows, plan.windows[1:]))  # nothing shared
    assert all(_prompt_tokens(small, item.question, [units[k] for k in window]) <= 1024 for window in plan.windows)
    scored = small.scored(item.question, units)
    assert scored.windows == len(plan.windows) and len(scored.ranked) == len(units)


def test_early_exit_matches_eager_attention(float32_model: ScoringModel) -> None:
    model, tokenizer, _ = float32_model
    layers = [0, 5, 11, 17]
    scorer = QRHeadScorer(model, tokenizer, [(layer, head) for layer in layers for head in (0, 4, 8)])
    prompt = scorer.build_prompt(QUERY, UNITS)
    reference = _eager_reference(model, prompt, layers)  # [4, 9, n_context]

    # Token level: every head of the chosen layers.
    mine = scorer.token_scores(prompt, {layer: list(range(scorer.n_heads)) for layer in layers})
    assert torch.allclose(mine, reference.reshape(-1, reference.shape[-1]), atol=2e-6)
    # Unit level, per head (detection) and summed over the head set (scoring).
    per_head = scorer.per_head_unit_scores(QUERY, UNITS, layers=layers)
    assert torch.allclose(per_head, unit_scores(reference, prompt.spans), atol=1e-5)
    summed = unit_scores(reference[:, [0, 4, 8]].sum(dim=(0, 1)), prompt.spans)
    assert scorer.score(QUERY, UNITS) == pytest.approx(summed.tolist(), abs=1e-5)


def test_forward_stops_at_the_deepest_selected_layer(scoring_model: ScoringModel) -> None:
    model, tokenizer, _ = scoring_model
    scorer = QRHeadScorer(model, tokenizer, [(3, 1), (6, 2)])
    layers = scorer.decoder.layers
    called: list[str] = []
    hooks = [layers[i].register_forward_hook(lambda *_, i=i: called.append(f"layer {i}")) for i in range(len(layers))]
    hooks.append(model.lm_head.register_forward_hook(lambda *_: called.append("lm_head")))
    hooks.append(layers[6].mlp.register_forward_hook(lambda *_: called.append("layer 6 mlp")))
    try:
        scorer.score(QUERY, UNITS)
    finally:
        for hook in hooks:
            hook.remove()
    # Layers 0-5 run (context, then the tails); layer 6 only projects queries and keys.
    assert sorted(set(called)) == sorted(f"layer {i}" for i in range(6))


def test_a_pasted_40k_character_query_is_capped_and_scores_in_one_window(scorer: QRHeadScorer, monkeypatch) -> None:
    """Issue 18: everything after the last prose paragraph becomes the query. Uncapped, a question
    followed by pasted JSON left a 64-token context budget: one window per unit, positions past
    the model's limit and GBs of row attention per head."""
    pasted = QUERY + "\n" + '{"key": "value", "n": 12345}, ' * 1400
    assert len(pasted) > 40_000
    windows: list[int] = []
    real = scorer._batch_token_scores

    def counted(prompts, heads_by_layer):  # type: ignore[no-untyped-def]
        windows.extend(len(prompt.context) + len(prompt.query_tail) for prompt in prompts)
        return real(prompts, heads_by_layer)

    monkeypatch.setattr(scorer, "_batch_token_scores", counted)
    scores = scorer.score(pasted, UNITS * 10)
    assert len(windows) == 1 and windows[0] <= scorer.window_tokens
    assert len(scores) == 40 and all(s == s for s in scores)  # no NaN
    prompt = scorer.build_prompt(pasted, UNITS)
    assert len(prompt.query_tail) <= scorer.max_query_tokens + len(scorer.pieces.tail([]))


def test_per_head_scores_refuse_layers_they_would_mislabel(scorer: QRHeadScorer) -> None:
    with pytest.raises(ValueError, match="ascending"):
        scorer.per_head_unit_scores(QUERY, UNITS, layers=[5, 3])


def test_a_unit_bigger_than_a_window_scores_its_best_piece(scorer: QRHeadScorer) -> None:
    # A 'tool output' of several windows whose one relevant line sits near its end, next to short
    # unrelated units, in 700-token windows: cut to its first window-full (as before), the relevant
    # line is never seen; in two pieces (its first and its last), the last holds it.
    filler = [f"row {i}: status ok, latency {i % 7} ms, region eu-west-{i % 3}" for i in range(190)]
    tool_output = "\n".join([*filler, UNITS[0], *filler[:10]])
    units = [UNITS[1], tool_output, UNITS[2], UNITS[3]]
    pieces = QRHeadScorer(scorer.model, scorer.tokenizer, scorer.heads, window_tokens=700, overlap_tokens=100,
                          max_unit_pieces=2)
    first_only = QRHeadScorer(scorer.model, scorer.tokenizer, scorer.heads, window_tokens=700, overlap_tokens=100,
                              max_unit_pieces=1)
    assert len(pieces._encode_units([tool_output])[0]) > 3 * 700
    scored = pieces.scored(QUERY, units)
    assert scored.windows == 2 + 2  # two pieces of the big unit, two windows for the rest
    assert QRHeadScorer(scorer.model, scorer.tokenizer, scorer.heads).max_unit_pieces == 1  # a CPU's default
    before = first_only.scored(QUERY, units)
    # Measured: its best piece scores 0.52 against 0.10 for its first window-full; in the joint
    # window its best stretch stands in for it and ranks it first (0.35, the next 0.07), where
    # the first window-full left it behind an unrelated sentence.
    assert scored.windowed[1] > 2 * before.windowed[1]
    assert max(range(4), key=scored.ranked.__getitem__) == 1, scored.ranked
    assert max(range(4), key=before.ranked.__getitem__) != 1, before.ranked
