"""The answer-parity maths (bench/stats.py): edit distance and the paired bootstrap."""

from __future__ import annotations

import random

import pytest

from bench.stats import levenshtein, paired_bootstrap, share_within


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abc", 3),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("Paris", "Paris", 0),
        ("Paris.", "Paris", 1),
        ("gumbo", "gambol", 2),
        ("ab", "ba", 2),  # a transposition is two edits, not one (this is not Damerau)
    ],
)
def test_levenshtein_known_values(a: str, b: str, distance: int) -> None:
    assert levenshtein(a, b) == distance


def _reference(a: str, b: str) -> int:
    """The textbook full-matrix recursion, to check the two-row version against."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


def test_levenshtein_is_a_metric_and_matches_the_full_table() -> None:
    rng = random.Random(3)
    words = ["".join(rng.choice("abc ") for _ in range(rng.randint(0, 12))) for _ in range(60)]
    for a, b, c in zip(words, words[1:], words[2:]):
        assert levenshtein(a, b) == _reference(a, b) == levenshtein(b, a)
        assert levenshtein(a, c) <= levenshtein(a, b) + levenshtein(b, c)
        assert abs(len(a) - len(b)) <= levenshtein(a, b) <= max(len(a), len(b))


def test_share_within() -> None:
    assert share_within([0, 5, 6, 20, 21], 5) == 0.4
    assert share_within([0, 5, 6, 20, 21], 20) == 0.8
    with pytest.raises(ValueError):
        share_within([], 5)


def test_identical_arms_give_a_zero_width_interval_at_zero() -> None:
    values = [1.0, 0.0, 1.0, 1.0, 0.0] * 40
    result = paired_bootstrap(values, values, resamples=2_000)
    assert (result.mean, result.low, result.high) == (0.0, 0.0, 0.0)
    assert result.includes_zero()


def test_a_constant_shift_is_found_exactly() -> None:
    # Every item loses exactly one point: every resample's mean is -1.
    result = paired_bootstrap([1.0] * 50, [0.0] * 50, resamples=500)
    assert (result.mean, result.low, result.high) == (-1.0, -1.0, -1.0)
    assert not result.includes_zero()


def test_the_interval_covers_the_mean_and_is_seeded() -> None:
    rng = random.Random(11)
    full = [float(rng.random() < 0.4) for _ in range(200)]
    compressed = [f if rng.random() < 0.9 else 1.0 - f for f in full]
    first = paired_bootstrap(full, compressed, seed=5)
    assert first.low <= first.mean <= first.high
    assert first == paired_bootstrap(full, compressed, seed=5)
    assert first.resamples == 10_000 and first.confidence == 0.95
    # A wider confidence level gives a wider interval on the same resamples.
    wider = paired_bootstrap(full, compressed, seed=5, confidence=0.99)
    assert wider.low <= first.low and wider.high >= first.high


def test_pairing_narrows_the_interval() -> None:
    """Two arms that differ on 4 of 200 items: the paired interval is far narrower than the
    ±0.1 an unpaired comparison of two 40 % success rates would give."""
    full = [1.0] * 80 + [0.0] * 120
    compressed = list(full)
    for i in (0, 1, 2, 3):
        compressed[i] = 0.0
    result = paired_bootstrap(full, compressed)
    assert result.mean == pytest.approx(-0.02)
    assert -0.045 <= result.low < result.high <= 0.0


def test_the_bootstrap_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap([], [])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0], confidence=1.0)


def _answer(text: str, before: int, after: int, prompt_tokens: int, compression: str = "compressed") -> dict:
    return {"text": text, "prompt_tokens": prompt_tokens, "completion_tokens": 5, "compression": compression,
            "tokens_before": before, "tokens_after": after, "tokens_saved": before - after, "seconds": 1.0}


def test_summarise_counts_em_distance_ratio_and_header_identity() -> None:
    from bench.parity import summarise

    rows = [
        {"answers": ["Paris"], "full": _answer("Paris.", 100, 100, 100, "disabled"),
         "compressed": {"0.5": _answer("Paris.", 100, 50, 50)}},
        {"answers": ["1912"], "full": _answer("In 1912", 200, 200, 200, "disabled"),
         "compressed": {"0.5": _answer("In 1913", 201, 100, 100)}},  # before off by one: counted
        {"answers": ["blue"], "full": _answer("It is blue", 100, 100, 100, "disabled"),
         # after != upstream, and the Gateway failed open
         "compressed": {"0.5": _answer("I do not know the colour of it at all", 100, 100, 99, "failed")}},
    ]
    summary = summarise(rows, "0.5")
    assert summary.n == 3 and summary.compressed_outcomes == 2
    assert summary.em_full == 1.0 and summary.em_compressed == pytest.approx(1 / 3)
    assert summary.difference.mean == pytest.approx(-2 / 3)
    assert (summary.identical, summary.within_5) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert summary.kept_mean == pytest.approx((0.5 + 100 / 201 + 1.0) / 3)
    assert summary.kept_total == pytest.approx(250 / 401)
    assert summary.header_after_is_upstream == 2 and summary.header_sum_holds == 3
    assert summary.before_is_full_bill == 2 and summary.before_max_gap == 1


def test_the_headline_calls_a_gain_or_a_loss_only_where_the_interval_excludes_zero() -> None:
    from dataclasses import replace

    from bench.parity import em_verdict, parity_holds, summarise
    from bench.stats import PairedDifference

    rows = [{"answers": ["Paris"], "full": _answer("Paris.", 100, 100, 100, "disabled"),
             "compressed": {"0.5": _answer("Paris.", 100, 50, 50)}}]
    base = summarise(rows, "0.5")
    verdicts = {}
    for low, high in ((0.005, 0.13), (-0.04, 0.05), (-0.09, -0.01)):
        summary = replace(base, difference=PairedDifference(0.0, low, high, 0.95, 10_000))
        verdicts[(low, high)] = (em_verdict(summary), parity_holds(summary))
    assert verdicts == {
        (0.005, 0.13): ("a measurable EM gain", True),
        (-0.04, 0.05): ("no measurable EM difference", True),
        (-0.09, -0.01): ("a measurable EM loss", False),
    }
