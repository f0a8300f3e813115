"""Combining two relevance scores per unit (QR heads and a dense encoder). Pure functions.

The two scores live on unrelated scales (summed attention mass vs cosine similarity), so they are
made comparable per request before mixing: by rank (reciprocal-rank fusion) or by standardising
each list over the request's units (z-score, min-max). ``weight`` is the QR-head share: 1 keeps
the QR-head order, 0 the dense order.

The pre-filter picks the units the (expensive) QR-head pass rescores; ``merge_prefiltered`` puts
the units it left out below every rescored one, still in dense order, so a budget larger than the
pre-filter's still fills with the best of the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

FusionMethod = Literal["rrf", "zscore", "minmax"]
FUSION_METHODS: tuple[FusionMethod, ...] = ("rrf", "zscore", "minmax")
RRF_K = 60  # Cormack et al. (2009); it damps the difference between the first few ranks


def ranks(scores: Sequence[float]) -> list[int]:
    """0 for the best score; tied scores share the better rank (1, 1 -> 0, 0), so equal inputs
    fuse to equal outputs and the policy's own tie rule (later unit first) still applies."""
    ordered = sorted(scores, reverse=True)
    first: dict[float, int] = {}
    for position, value in enumerate(ordered):
        first.setdefault(value, position)
    return [first[value] for value in scores]


def zscore(scores: Sequence[float]) -> list[float]:
    """(x - mean) / std over the list (population std); a constant list gives zeros."""
    if not scores:
        return []
    mean = math.fsum(scores) / len(scores)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in scores) / len(scores))
    # Relative guard: float noise around a constant list must not blow up into +-1.
    if std <= 1e-12 * max(1.0, abs(mean)):
        return [0.0] * len(scores)
    return [(x - mean) / std for x in scores]


def minmax(scores: Sequence[float]) -> list[float]:
    """Scaled to [0, 1] over the list; a constant list gives zeros."""
    if not scores:
        return []
    low, high = min(scores), max(scores)
    if high - low <= 1e-12 * max(1.0, abs(high), abs(low)):
        return [0.0] * len(scores)
    return [(x - low) / (high - low) for x in scores]


def _check(qr_scores: Sequence[float], dense_scores: Sequence[float], weight: float) -> None:
    if len(qr_scores) != len(dense_scores):
        raise ValueError(f"one score per unit from each scorer: {len(qr_scores)} vs {len(dense_scores)}")
    if not 0.0 <= weight <= 1.0:  # also refuses NaN
        raise ValueError(f"weight must be between 0 and 1, got {weight}")
    for name, values in (("qr_scores", qr_scores), ("dense_scores", dense_scores)):
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise ValueError(f"{name}[{i}] is {value}")


def fuse(
    qr_scores: Sequence[float],
    dense_scores: Sequence[float],
    method: FusionMethod = "zscore",
    weight: float = 0.5,
) -> list[float]:
    """One fused score per unit: ``weight * f(qr) + (1 - weight) * f(dense)``, f per ``method``.

    ``rrf``: f is 1 / (RRF_K + 1 + rank). ``zscore`` / ``minmax``: f standardises over the list.
    At weight 1 (or 0) every method is an increasing function of the QR (dense) score alone.
    """
    _check(qr_scores, dense_scores, weight)
    if method == "rrf":
        first = [1.0 / (RRF_K + 1 + r) for r in ranks(qr_scores)]
        second = [1.0 / (RRF_K + 1 + r) for r in ranks(dense_scores)]
    elif method == "zscore":
        first, second = zscore(qr_scores), zscore(dense_scores)
    elif method == "minmax":
        first, second = minmax(qr_scores), minmax(dense_scores)
    else:
        raise ValueError(f"unknown fusion method {method!r}; use one of {FUSION_METHODS}")
    # The exact ends skip the other term, so weight 1 is the QR order even where f(dense) ties.
    if weight == 1.0:
        return list(first)
    if weight == 0.0:
        return list(second)
    return [weight * a + (1.0 - weight) * b for a, b in zip(first, second)]


def prefilter(
    dense_scores: Sequence[float],
    keep: int | float,
    costs: Sequence[int] | None = None,
) -> list[int]:
    """Indices (ascending) of the units worth rescoring: the best by dense score that fit ``keep``.

    ``keep``: an int is a budget in cost units (tokens when ``costs`` are token counts, else
    units); a float in (0, 1] is that share of the total cost. Units are taken best first (the
    later unit on a tie, as the policy does); one that does not fit is skipped and smaller ones
    are still tried. The best unit is always kept, so a non-empty input never comes back empty.
    """
    n = len(dense_scores)
    costs = [1] * n if costs is None else list(costs)
    if len(costs) != n:
        raise ValueError(f"one cost per unit: {len(costs)} costs for {n} scores")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int budget or a float share, got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"a share to keep must be in (0, 1], got {keep}")
        budget = math.floor(keep * sum(costs) + 1e-9)
    else:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        budget = keep
    order = sorted(range(n), key=lambda i: (dense_scores[i], i), reverse=True)
    kept: list[int] = []
    left = budget
    for i in order:
        if costs[i] <= left:
            kept.append(i)
            left -= costs[i]
    if not kept and order:
        kept.append(order[0])
    return sorted(kept)


def merge_prefiltered(
    dense_scores: Sequence[float], kept: Sequence[int], kept_scores: Sequence[float]
) -> list[float]:
    """Scores for all units: ``kept_scores`` for the rescored ``kept`` units; every other unit
    scores below the lowest of those, one step per dense rank (ties share a step)."""
    if len(kept) != len(kept_scores):
        raise ValueError(f"one rescored value per kept unit: {len(kept_scores)} for {len(kept)}")
    n = len(dense_scores)
    if len(set(kept)) != len(kept) or any(not 0 <= i < n for i in kept):
        raise ValueError("kept must hold distinct indices of dense_scores")
    out = [0.0] * n
    for i, value in zip(kept, kept_scores):
        out[i] = float(value)
    rescored = set(kept)
    rest = [i for i in range(n) if i not in rescored]
    if not rest:
        return out
    floor = min(kept_scores) if kept_scores else 0.0
    for i, r in zip(rest, ranks([dense_scores[i] for i in rest])):
        out[i] = floor - 1.0 - r
    return out
