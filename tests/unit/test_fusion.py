"""Score fusion and the dense pre-filter: pure functions, on edge cases and random inputs."""

from __future__ import annotations

import random

import pytest

from ccproxy.compression.fusion import (
    FUSION_METHODS,
    RRF_K,
    fuse,
    merge_prefiltered,
    minmax,
    prefilter,
    ranks,
    zscore,
)


def order(scores: list[float]) -> list[int]:
    """The order the policy takes units in: best first, the later unit on a tie."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i), reverse=True)


def random_scores(rng: random.Random, n: int, ties: bool = False) -> list[float]:
    if ties:
        return [float(rng.randint(0, 3)) for _ in range(n)]
    return [rng.uniform(-5, 5) for _ in range(n)]


def test_ranks_best_first_and_ties_share_the_better_rank() -> None:
    assert ranks([0.1, 0.9, 0.5]) == [2, 0, 1]
    assert ranks([1.0, 1.0, 0.0]) == [0, 0, 2]
    assert ranks([]) == []


def test_standardisations() -> None:
    assert zscore([1.0, 3.0]) == [-1.0, 1.0]
    assert minmax([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    # Constant lists carry no preference: all zero, not a division by zero.
    assert zscore([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]
    assert minmax([7.0]) == [0.0]
    assert zscore([]) == [] and minmax([]) == []


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_empty_and_single_unit(method: str) -> None:
    assert fuse([], [], method) == []
    [only] = fuse([0.2], [-0.4], method, 0.5)
    assert isinstance(only, float)


@pytest.mark.parametrize("method", FUSION_METHODS)
@pytest.mark.parametrize("ties", [False, True])
def test_weight_one_is_the_qr_order_and_zero_the_dense_order(method: str, ties: bool) -> None:
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 12)
        qr, dense = random_scores(rng, n, ties), random_scores(rng, n, ties)
        assert order(fuse(qr, dense, method, 1.0)) == order(qr)
        assert order(fuse(qr, dense, method, 0.0)) == order(dense)


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_order_depends_on_the_orders_only_where_it_should(method: str) -> None:
    rng = random.Random(3)
    for _ in range(100):
        n = rng.randint(2, 10)
        qr, dense = random_scores(rng, n), random_scores(rng, n)
        fused = fuse(qr, dense, method, 0.6)
        # Any scale and shift of either list leaves every standardised score (and RRF) unchanged.
        scaled = fuse([3 * x + 1 for x in qr], [0.01 * x - 2 for x in dense], method, 0.6)
        assert scaled == pytest.approx(fused, abs=1e-9)
        # Permuting the units permutes the fused scores with them.
        perm = list(range(n))
        rng.shuffle(perm)
        permuted = fuse([qr[p] for p in perm], [dense[p] for p in perm], method, 0.6)
        assert permuted == pytest.approx([fused[p] for p in perm], abs=1e-12)


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_a_unit_first_in_both_lists_is_first_after_fusion(method: str) -> None:
    rng = random.Random(11)
    for _ in range(200):
        n = rng.randint(1, 10)
        qr, dense = random_scores(rng, n), random_scores(rng, n)
        best = rng.randrange(n)
        qr[best], dense[best] = max(qr) + 1, max(dense) + 1
        fused = fuse(qr, dense, method, rng.random())
        assert order(fused)[0] == best


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_equal_inputs_fuse_to_equal_outputs(method: str) -> None:
    fused = fuse([0.5, 0.5, 0.1], [0.2, 0.2, 0.9], method, 0.5)
    assert fused[0] == fused[1]


def test_rrf_values() -> None:
    assert fuse([0.9, 0.1], [0.1, 0.9], "rrf", 0.5) == pytest.approx(
        [0.5 / (RRF_K + 1) + 0.5 / (RRF_K + 2)] * 2
    )


def test_a_middle_weight_can_overturn_either_scorer() -> None:
    # The QR heads prefer unit 1 by a hair, the dense encoder unit 0 by a lot.
    qr, dense = [1.0, 1.01, 0.0], [0.9, 0.1, 0.0]
    assert order(fuse(qr, dense, "zscore", 1.0))[0] == 1
    assert order(fuse(qr, dense, "zscore", 0.5))[0] == 0


@pytest.mark.parametrize(
    ("qr", "dense", "weight", "message"),
    [
        ([1.0], [1.0, 2.0], 0.5, "one score per unit"),
        ([1.0], [1.0], 1.5, "weight must be"),
        ([1.0], [1.0], float("nan"), "weight must be"),
        ([float("nan")], [1.0], 0.5, "qr_scores"),
        ([1.0], [float("inf")], 0.5, "dense_scores"),
    ],
)
def test_fuse_refuses_bad_input(qr: list[float], dense: list[float], weight: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fuse(qr, dense, "zscore", weight)


def test_fuse_refuses_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse([1.0], [1.0], "borda", 0.5)  # type: ignore[arg-type]


# --- the pre-filter ---------------------------------------------------------------------------


def test_prefilter_keeps_the_best_that_fit_in_document_order() -> None:
    dense = [0.1, 0.9, 0.5, 0.7]
    assert prefilter(dense, 2) == [1, 3]
    assert prefilter(dense, 10) == [0, 1, 2, 3]
    # Token costs: unit 1 (best) and unit 2 fit 60 tokens; unit 3 (second best, 50) does not.
    assert prefilter(dense, 60, [10, 30, 30, 50]) == [1, 2]
    # A share of the total cost: half of 120 tokens.
    assert prefilter(dense, 0.5, [10, 30, 30, 50]) == [1, 2]


def test_prefilter_ties_go_to_the_later_unit_like_the_policy() -> None:
    assert prefilter([0.5, 0.5, 0.5], 1) == [2]
    assert prefilter([0.5, 0.5, 0.1], 1) == [1]


def test_prefilter_never_comes_back_empty() -> None:
    assert prefilter([], 5) == []
    assert prefilter([0.3], 0) == [0]
    assert prefilter([0.1, 0.2], 5, [100, 100]) == [1]


@pytest.mark.parametrize(
    ("keep", "error"),
    [(-1, ValueError), (0.0, ValueError), (1.5, ValueError), (True, TypeError), ("3", TypeError)],
)
def test_prefilter_refuses_bad_keep(keep: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        prefilter([0.1, 0.2], keep)  # type: ignore[arg-type]


def test_prefilter_refuses_mismatched_or_negative_costs() -> None:
    with pytest.raises(ValueError, match="one cost per unit"):
        prefilter([0.1, 0.2], 1, [1])
    with pytest.raises(ValueError, match=">= 0"):
        prefilter([0.1, 0.2], 1, [1, -1])


def test_prefilter_random_inputs_fit_and_dominate() -> None:
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(1, 15)
        dense = random_scores(rng, n, ties=rng.random() < 0.3)
        costs = [rng.randint(0, 50) for _ in range(n)]
        budget = rng.randint(0, 200)
        kept = prefilter(dense, budget, costs)
        assert kept == sorted(set(kept)) and kept
        assert sum(costs[i] for i in kept) <= budget or len(kept) == 1
        # Every left-out unit either ranks below all kept ones or would not have fit.
        left = budget - sum(costs[i] for i in kept)
        for i in set(range(n)) - set(kept):
            assert costs[i] > left or all((dense[i], i) < (dense[k], k) for k in kept)


def test_merge_puts_left_out_units_below_in_dense_order() -> None:
    dense = [0.9, 0.1, 0.5, 0.3, 0.3]
    merged = merge_prefiltered(dense, [0, 2], [2.0, 4.0])
    assert merged[0] == 2.0 and merged[2] == 4.0
    assert max(merged[1], merged[3], merged[4]) < 2.0
    assert merged[3] == merged[4] > merged[1]  # dense ties stay tied


def test_merge_edge_cases() -> None:
    assert merge_prefiltered([], [], []) == []
    assert merge_prefiltered([0.2, 0.1], [0, 1], [0.5, -3.0]) == [0.5, -3.0]
    with pytest.raises(ValueError, match="one rescored value"):
        merge_prefiltered([0.2, 0.1], [0], [])
    with pytest.raises(ValueError, match="distinct indices"):
        merge_prefiltered([0.2, 0.1], [0, 0], [1.0, 1.0])
    with pytest.raises(ValueError, match="distinct indices"):
        merge_prefiltered([0.2, 0.1], [2], [1.0])


def test_merge_with_everything_kept_is_the_rescored_scores() -> None:
    rng = random.Random(2)
    for _ in range(50):
        n = rng.randint(1, 8)
        scores = random_scores(rng, n)
        assert merge_prefiltered(random_scores(rng, n), list(range(n)), scores) == scores
