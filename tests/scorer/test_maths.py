"""The scorer's pure functions, without a model."""

from __future__ import annotations

import pytest
import torch

from ccproxy.compression.qrhead import (
    batch_tail_mask,
    best_stretch,
    calibrated_token_scores,
    combined_heads,
    middle_layers,
    padded_batches,
    piece_starts,
    plan_windows,
    rows_attention,
    tail_mask,
    unit_scores,
)


def test_unit_scores_drop_tokens_below_mean_minus_two_std() -> None:
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -5.0, 2.0, 3.0])
    spans = [(0, 10), (10, 12), (12, 12)]
    out = unit_scores(scores, spans)
    # Unit 0: the -5 outlier lies below mean - 2 std and is dropped; unit 1 keeps both tokens.
    assert out.tolist() == [9.0, 5.0, 0.0]


def test_unit_scores_keep_single_token_units_and_broadcast_over_heads() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.4, 0.0]])
    out = unit_scores(scores, [(0, 1), (1, 3)])
    assert torch.allclose(out, torch.tensor([[0.5, 0.3], [0.3, 0.4]]))


def test_tail_mask_keeps_tails_apart() -> None:
    mask = tail_mask(3, [2, 2])
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_rows_attention_reads_the_kv_group_and_respects_the_mask() -> None:
    torch.manual_seed(0)
    queries = torch.randn(4, 2, 8)  # 4 query heads
    keys = torch.randn(2, 5, 8)  # 2 KV heads: heads 0,1 read group 0; heads 2,3 group 1
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    probs = rows_attention(queries, keys, torch.tensor([0, 0, 1, 1]), mask, 8**-0.5)
    assert torch.allclose(probs.sum(-1), torch.ones(4, 2))
    assert torch.all(probs[:, 0, 4] == 0)
    expected = torch.softmax(queries[3, 1] @ keys[1].T * 8**-0.5, dim=-1)
    assert torch.allclose(probs[3, 1], expected, atol=1e-6)


def test_calibration_subtracts_the_null_rows() -> None:
    probs = torch.zeros(1, 3, 4)
    probs[0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    probs[0, 1] = torch.tensor([0.1, 0.9, 0.0, 0.0])
    probs[0, 2] = torch.tensor([0.2, 0.2, 0.0, 0.6])  # the "N/A" row
    out = calibrated_token_scores(probs, n_context=2, n_query_rows=2)
    assert torch.allclose(out, torch.tensor([[0.1, 0.5]]))


def test_plan_windows_covers_every_unit_with_bounded_overlap() -> None:
    costs = [30, 50, 20, 70, 10, 40, 60, 25, 35, 45]
    windows = plan_windows(costs, budget=120, overlap=40)
    covered = sorted({k for w in windows for k in w})
    assert covered == list(range(len(costs)))
    for window in windows:
        assert len(window) == 1 or sum(costs[k] for k in window) <= 120
    for before, after in zip(windows, windows[1:]):
        assert after.start > before.start and after.start <= before.stop
        assert sum(costs[k] for k in range(after.start, before.stop)) <= 40


def test_plan_windows_one_window_when_everything_fits_and_alone_for_giants() -> None:
    assert plan_windows([10, 20, 30], budget=60, overlap=10) == [range(0, 3)]
    assert plan_windows([10, 500, 10], budget=100, overlap=0) == [range(0, 1), range(1, 2), range(2, 3)]
    assert plan_windows([], budget=100, overlap=0) == []


def test_middle_layers_is_the_middle_third() -> None:
    assert middle_layers(30) == range(10, 20)
    assert list(middle_layers(2)) == [0]


def test_a_long_query_keeps_its_first_and_last_halves() -> None:
    from ccproxy.compression.qrhead import capped_query

    assert capped_query([1, 2, 3], 4) == [1, 2, 3]
    assert capped_query(list(range(10)), 4) == [0, 1, 8, 9]
    assert capped_query(list(range(10)), 5) == [0, 1, 7, 8, 9]


def test_joint_candidates_take_each_windows_best_in_turn() -> None:
    from ccproxy.compression.qrhead import joint_candidates

    # Two windows sharing unit 2; window A ranks 1 > 2 > 0, window B ranks 4 > 2 > 3.
    local = [([0, 1, 2], [0.1, 0.9, 0.5]), ([2, 3, 4], [0.6, 0.2, 0.8])]
    costs = [10] * 5
    assert joint_candidates(local, costs, 20) == [1, 4]  # both firsts before any second
    assert joint_candidates(local, costs, 30) == [1, 2, 4]  # unit 2 is taken once
    assert joint_candidates(local, costs, 100) == [0, 1, 2, 3, 4]
    assert joint_candidates(local, [10, 50, 10, 10, 10], 25) == [2, 4]  # 1 does not fit: passed over


def test_joint_ranking_puts_candidates_first_and_keeps_the_rest_in_order() -> None:
    from ccproxy.compression.qrhead import joint_ranking

    windowed = [0.9, 0.1, 0.5, 0.5, 0.3]
    ranked = joint_ranking(windowed, [1, 4], [0.2, 0.6])
    assert ranked[1] == 0.2 and ranked[4] == 0.6
    rest = [0, 2, 3]
    assert all(ranked[k] < 0.2 for k in rest)
    assert ranked[0] > ranked[2] == ranked[3]  # the windowed order, ties kept
    assert min(ranked) >= 0.2 - (0.6 - 0.2)  # within one spread: comparable scales for fusion


def test_batch_tail_mask_is_each_prompts_own_mask_with_pads_masked() -> None:
    # Two prompts padded to a context of 5 and a tail of 4: contexts 5 and 3, tails (2, 2) and (1, 1).
    mask = batch_tail_mask([5, 3], [(2, 2), (1, 1)], 5)
    assert mask.shape == (2, 4, 9)
    own0 = tail_mask(5, [2, 2])
    assert torch.equal(mask[0], own0)  # the longest prompt needs no padding
    own1 = tail_mask(3, [1, 1])  # [2, 5]
    assert torch.equal(mask[1, :2, :3], own1[:, :3])  # its own context
    assert not mask[1, :2, 3:5].any()  # never the padded context
    assert torch.equal(mask[1, :2, 5:7], own1[:, 3:])  # its own tails, apart
    assert not mask[1, :2, 7:].any()
    # Pad rows see key 0 only: no empty softmax row.
    assert mask[1, 2:].sum(dim=-1).tolist() == [1, 1] and mask[1, 2:, 0].all()


def test_padded_batches_group_longest_first_within_the_token_cap() -> None:
    lengths = [1000, 6000, 900, 1100, 6000, 20_000]
    groups = padded_batches(lengths, 12_000)
    assert groups == [[5], [1, 4], [3, 0, 2]]  # 20 k alone; 2 x 6 k; 3 x 1.1 k
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * lengths[group[0]] <= 12_000
    assert padded_batches([], 100) == []


def test_a_long_unit_scores_its_best_stretch_a_short_one_its_sum() -> None:
    # A 3-token unit of 1.5 in all, then a 10-token unit with 0.2 a token and 1.0 at tokens 5-6.
    long = [0.2] * 10
    long[5] = long[6] = 1.0
    scores = torch.tensor([0.4, 0.5, 0.6, *long])
    spans = [(0, 3), (3, 13)]
    plain = unit_scores(scores, spans, window=None)
    assert plain.tolist() == pytest.approx([1.5, 3.6])  # the long one wins by length
    best = unit_scores(scores, spans, window=3)
    assert best.tolist() == pytest.approx([1.5, 2.2])  # its best 3 tokens: 1.0 + 1.0 + 0.2
    assert best_stretch(scores, (3, 13), window=3) == 4  # tokens 4-6 of the long unit: 0.2 + 1.0 + 1.0
    assert best_stretch(scores, (0, 3), window=3) == 0  # short: the whole unit
    # Per head rows too, each row its own best stretch.
    rows = torch.stack([scores, scores.flip(0)])
    assert unit_scores(rows, [(0, 13)], window=2)[:, 0].tolist() == pytest.approx([2.0, 2.0])


def test_combined_heads_sum_plain_or_weighted() -> None:
    tokens = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    assert combined_heads(tokens, None).tolist() == [[11.0, 22.0, 33.0]]
    assert combined_heads(tokens, torch.tensor([2.0, 0.0])).tolist() == [[2.0, 4.0, 6.0]]


def test_an_oversized_unit_is_cut_into_few_even_pieces_that_cover_its_ends() -> None:
    assert piece_starts(90, 100, 4) == [0]  # fits: one piece
    assert piece_starts(250, 100, 4) == [0, 75, 150]  # three pieces cover 250 tokens
    starts = piece_starts(50_000, 5_000, 4)  # ten would cover it: four, spread evenly
    assert starts == [0, 15_000, 30_000, 45_000] and starts[-1] + 5_000 == 50_000
    assert piece_starts(50_000, 5_000, 1) == [0]
