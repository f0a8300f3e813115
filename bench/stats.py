"""The maths of the answer-parity benchmark: edit distance and a paired bootstrap.

Pure functions, no I/O, so that the figures in docs/BENCHMARKS.md rest on tested code.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert, delete, substitute; each costs 1).

    The answers compared are a few dozen tokens long, so the quadratic DP is cheap and saves
    a dependency. Two rows only: memory grows with the shorter string.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(
                previous[j] + 1,  # delete char_a
                current[j - 1] + 1,  # insert char_b
                previous[j - 1] + (char_a != char_b),  # substitute (free when equal)
            ))
        previous = current
    return previous[-1]


def share_within(distances: Sequence[int], limit: int) -> float:
    """Share of the distances that are at most ``limit``."""
    if not distances:
        raise ValueError("no distances")
    return sum(1 for d in distances if d <= limit) / len(distances)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (treated − baseline) over paired items, with a percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    confidence: float
    resamples: int

    def includes_zero(self) -> bool:
        return self.low <= 0.0 <= self.high


def paired_bootstrap(
    baseline: Sequence[float],
    treated: Sequence[float],
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Bootstrap CI of mean(treated − baseline), resampling items (pairs stay together).

    Resampling pairs rather than each arm on its own is what makes the interval narrow when
    both arms succeed and fail on the same items, which is the point of a paired design.
    The percentile method; seeded, so a rerun prints the same interval.
    """
    if len(baseline) != len(treated):
        raise ValueError(f"unpaired: {len(baseline)} baseline vs {len(treated)} treated values")
    if not baseline:
        raise ValueError("no pairs")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    differences = np.asarray(treated, dtype=float) - np.asarray(baseline, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(float(differences.mean()), float(low), float(high), confidence, resamples)


BOOTSTRAP_SAMPLES = 2000


def share(values: Sequence[bool]) -> float:
    """The share of true values; NaN for none."""
    return sum(values) / len(values) if values else float("nan")


def bootstrap_ci(values: Sequence[tuple[float, float]], seed: int) -> tuple[float, float]:
    """95 % percentile interval of sum(a) / sum(b) over the units (conversations, traces)
    resampled with replacement."""
    rng = random.Random(seed)
    estimates = []
    for _ in range(BOOTSTRAP_SAMPLES):
        sample = [values[rng.randrange(len(values))] for _ in values]
        denominator = sum(b for _, b in sample)
        estimates.append(sum(a for a, _ in sample) / denominator if denominator else 0.0)
    estimates.sort()
    return estimates[int(0.025 * len(estimates))], estimates[int(0.975 * len(estimates)) - 1]
