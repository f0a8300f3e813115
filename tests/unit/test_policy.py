"""The budget and the selection: pure functions, checked on edge cases and random inputs."""

from __future__ import annotations

import random

import pytest

from ccproxy.compression.policy import allowance, select, should_compress


def test_should_compress_only_from_the_threshold_on() -> None:
    assert not should_compress(999, 1000)
    assert should_compress(1000, 1000)
    assert should_compress(5000, 1000)
    assert should_compress(0, 0)


@pytest.mark.parametrize(("context", "threshold"), [(-1, 10), (10, -1)])
def test_should_compress_refuses_negative_counts(context: int, threshold: int) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        should_compress(context, threshold)


def test_ratio_is_a_share_of_the_unprotected_tokens() -> None:
    tokens = [100, 30, 70]
    protected = [True, False, False]
    assert allowance(tokens, protected, ratio=0.5) == 50
    assert allowance(tokens, protected, ratio=0.0) == 0
    assert allowance(tokens, protected, ratio=1.0) == 100


def test_ratio_rounds_down_but_not_below_float_noise() -> None:
    assert allowance([7], [False], ratio=0.5) == 3
    # 0.29 * 100 is 28.999999999999996 in floating point.
    assert allowance([100], [False], ratio=0.29) == 29


def test_budget_caps_the_whole_context_protected_included() -> None:
    tokens = [100, 30, 70]
    protected = [True, False, False]
    assert allowance(tokens, protected, budget_tokens=150) == 50
    assert allowance(tokens, protected, budget_tokens=100) == 0
    # Protected units alone over budget: nothing else may stay, never a negative allowance.
    assert allowance(tokens, protected, budget_tokens=40) == 0


def test_with_ratio_and_budget_the_smaller_allowance_wins() -> None:
    tokens = [100, 30, 70]
    protected = [True, False, False]
    assert allowance(tokens, protected, ratio=0.5, budget_tokens=120) == 20
    assert allowance(tokens, protected, ratio=0.1, budget_tokens=1000) == 10


def test_budget_allowance_is_not_capped_by_what_exists() -> None:
    # Everything fits: the caller sees the headroom, and select keeps every unit.
    assert allowance([100, 30], [True, False], budget_tokens=1000) == 900


def test_allowance_of_nothing() -> None:
    assert allowance([], [], ratio=0.5) == 0
    assert allowance([], [], budget_tokens=10) == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give a ratio, a budget_tokens, or both"),
        ({"ratio": 1.5}, "ratio must be between 0 and 1"),
        ({"ratio": -0.1}, "ratio must be between 0 and 1"),
        ({"ratio": float("nan")}, "ratio must be between 0 and 1"),
        ({"budget_tokens": -1}, "budget_tokens must be >= 0"),
    ],
)
def test_allowance_refuses_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        allowance([10, 20], [False, True], **kwargs)  # type: ignore[arg-type]


def test_allowance_refuses_mismatched_lengths_and_negative_tokens() -> None:
    with pytest.raises(ValueError, match="one value per unit"):
        allowance([10, 20], [False], ratio=0.5)
    with pytest.raises(ValueError, match=r"unit_tokens\[1\] must be >= 0"):
        allowance([10, -2], [False, False], ratio=0.5)


def test_select_keeps_protected_units_even_with_no_allowance() -> None:
    assert select([50, 10, 50], [0.0, 9.0, 0.0], [True, False, True], 0) == [True, False, True]


def test_select_takes_the_highest_scores_that_fit() -> None:
    keep = select([10, 10, 10, 10], [0.1, 0.9, 0.5, 0.7], [False] * 4, 20)
    assert keep == [False, True, False, True]


def test_select_breaks_ties_for_the_later_unit() -> None:
    assert select([10, 10, 10], [1.0, 1.0, 1.0], [False] * 3, 10) == [False, False, True]
    assert select([10, 10, 10], [1.0, 1.0, 1.0], [False] * 3, 20) == [False, True, True]


def test_select_skips_a_unit_that_does_not_fit_and_tries_smaller_ones() -> None:
    # The best unit is too big, the third best no longer fits, the worst still does.
    keep = select([100, 30, 20, 40], [0.9, 0.8, 0.1, 0.5], [False] * 4, 60)
    assert keep == [False, True, True, False]


def test_select_takes_empty_units_for_free() -> None:
    assert select([0, 5], [0.0, 1.0], [False, False], 0) == [True, False]


def test_select_of_nothing_is_nothing() -> None:
    assert select([], [], [], 0) == []


def test_select_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one value per unit"):
        select([1, 2], [0.5], [False, False], 3)
    with pytest.raises(ValueError, match="allowance must be >= 0"):
        select([1], [0.5], [False], -1)
    with pytest.raises(ValueError, match=r"scores\[0\] is NaN"):
        select([1], [float("nan")], [False], 1)
    with pytest.raises(ValueError, match=r"unit_tokens\[0\] must be >= 0"):
        select([-1], [0.5], [False], 1)


def test_select_never_exceeds_the_allowance_on_random_inputs() -> None:
    rng = random.Random(20240611)
    for _ in range(2000):
        count = rng.randint(0, 30)
        tokens = [rng.choice([0, rng.randint(1, 20), rng.randint(1, 400)]) for _ in range(count)]
        # Few distinct scores, so ties happen often.
        scores = [rng.choice([0.0, 0.5, 1.0, rng.uniform(-5, 5)]) for _ in range(count)]
        protected = [rng.random() < 0.2 for _ in range(count)]
        ratio = rng.choice([None, rng.random(), 0.0, 1.0])
        budget = rng.choice([None, rng.randint(0, 3000)]) if ratio is not None else rng.randint(0, 3000)
        limit = allowance(tokens, protected, ratio=ratio, budget_tokens=budget)
        unprotected_total = sum(t for t, p in zip(tokens, protected) if not p)
        assert limit >= 0
        if ratio is not None:
            assert limit <= unprotected_total
        if budget is not None:
            protected_total = sum(t for t, p in zip(tokens, protected) if p)
            assert limit <= max(0, budget - protected_total)

        keep = select(tokens, scores, protected, limit)

        assert len(keep) == count
        assert all(keep[i] for i in range(count) if protected[i])
        kept_total = sum(t for t, k, p in zip(tokens, keep, protected) if k and not p)
        assert kept_total <= limit
        left = limit - kept_total
        # Greedy and complete: whatever was left out would not have fitted.
        assert all(tokens[i] > left for i in range(count) if not keep[i])
        # No unit is dropped while a worse-ranked one of the same or greater size is kept.
        rank = {i: (scores[i], i) for i in range(count)}
        for dropped in (i for i in range(count) if not keep[i]):
            for kept in (i for i in range(count) if keep[i] and not protected[i]):
                if tokens[kept] >= tokens[dropped]:
                    assert rank[kept] > rank[dropped]
