"""The budget and the selection: which units a compressed request keeps. Pure functions.

Token counts come from the caller (the upstream model's tokenizer); scores from the scorer.
Protected units are always kept and never count against the allowance of the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Guards the floor of ratio * tokens against float noise (0.29 * 100 == 28.999999999999996).
_RATIO_EPSILON = 1e-9


def should_compress(context_tokens: int, threshold_tokens: int) -> bool:
    """Whether a context is big enough to be worth scoring; below the threshold: do nothing."""
    if context_tokens < 0:
        raise ValueError(f"context_tokens must be >= 0, got {context_tokens}")
    if threshold_tokens < 0:
        raise ValueError(f"threshold_tokens must be >= 0, got {threshold_tokens}")
    return context_tokens >= threshold_tokens


def _check_tokens(unit_tokens: Sequence[int]) -> None:
    for i, tokens in enumerate(unit_tokens):
        if tokens < 0:
            raise ValueError(f"unit_tokens[{i}] must be >= 0, got {tokens}")


def _check_lengths(**sequences: Sequence[object]) -> None:
    lengths = {name: len(values) for name, values in sequences.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {length}" for name, length in lengths.items())
        raise ValueError(f"one value per unit is needed: {described}")


def allowance(
    unit_tokens: Sequence[int],
    protected: Sequence[bool],
    *,
    ratio: float | None = None,
    budget_tokens: int | None = None,
) -> int:
    """Tokens the unprotected units may keep.

    ``ratio`` is the share of the unprotected tokens kept (0..1). ``budget_tokens`` caps the
    whole context, protected units included, so it leaves ``budget_tokens - protected`` (never
    below 0). With both, the smaller allowance wins.
    """
    _check_lengths(unit_tokens=unit_tokens, protected=protected)
    _check_tokens(unit_tokens)
    if ratio is None and budget_tokens is None:
        raise ValueError("give a ratio, a budget_tokens, or both")
    protected_total = sum(t for t, is_protected in zip(unit_tokens, protected) if is_protected)
    unprotected_total = sum(unit_tokens) - protected_total
    limits: list[int] = []
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:  # also refuses NaN
            raise ValueError(f"ratio must be between 0 and 1, got {ratio}")
        limits.append(min(unprotected_total, math.floor(ratio * unprotected_total + _RATIO_EPSILON)))
    if budget_tokens is not None:
        if budget_tokens < 0:
            raise ValueError(f"budget_tokens must be >= 0, got {budget_tokens}")
        limits.append(max(0, budget_tokens - protected_total))
    return min(limits)


def select(
    unit_tokens: Sequence[int],
    scores: Sequence[float],
    protected: Sequence[bool],
    allowance: int,
) -> list[bool]:
    """Keep flags: every protected unit, then the best-scoring others that fit the allowance.

    Unprotected units are taken by descending score; on a tie the later unit goes first, as
    recent context matters more. A unit that does not fit is skipped and smaller ones are still
    tried, so the kept unprotected total never exceeds the allowance.
    """
    _check_lengths(unit_tokens=unit_tokens, scores=scores, protected=protected)
    _check_tokens(unit_tokens)
    if allowance < 0:
        raise ValueError(f"allowance must be >= 0, got {allowance}")
    for i, score in enumerate(scores):
        if math.isnan(score):
            raise ValueError(f"scores[{i}] is NaN")
    keep = [bool(is_protected) for is_protected in protected]
    candidates = sorted(
        (i for i, is_protected in enumerate(protected) if not is_protected),
        key=lambda i: (scores[i], i),
        reverse=True,
    )
    left = allowance
    for i in candidates:
        if unit_tokens[i] <= left:
            keep[i] = True
            left -= unit_tokens[i]
    return keep


@dataclass(frozen=True)
class Walk:
    """``select`` stopped at the best unit that does not fit (aggressive budgets): the units
    kept before it, the unit, the allowance left there, and the candidates after it."""

    keep: list[bool]
    misfit: int | None  # None: every candidate was tried (the walk is ``select``'s answer)
    left: int
    rest: list[int]


# Below this many tokens left, a unit is not cut for the few words that would fit.
MIN_PIECE_ALLOWANCE = 16


def walk(
    unit_tokens: Sequence[int],
    scores: Sequence[float],
    protected: Sequence[bool],
    allowance: int,
    can_descend: Callable[[int], bool],
) -> Walk:
    """``select``'s walk down the ranking, stopping at the first unit that does not fit and
    that ``can_descend`` into (with at least MIN_PIECE_ALLOWANCE tokens left for its pieces)."""
    keep = select(unit_tokens, scores, protected, 0)  # the protected ones; checks the inputs
    order = sorted((i for i, p in enumerate(protected) if not p), key=lambda i: (scores[i], i), reverse=True)
    left = allowance
    for position, i in enumerate(order):
        if unit_tokens[i] <= left:
            keep[i] = True
            left -= unit_tokens[i]
        elif left >= MIN_PIECE_ALLOWANCE and can_descend(i):
            return Walk(keep, i, left, order[position + 1 :])
    return Walk(keep, None, left, [])


def finish_walk(unit_tokens: Sequence[int], stopped: Walk, left: int) -> list[bool]:
    """The rest of the walk after the descent, with ``left`` tokens: whole units only."""
    keep = list(stopped.keep)
    for i in stopped.rest:
        if unit_tokens[i] <= left:
            keep[i] = True
            left -= unit_tokens[i]
    return keep


def pick_pieces(piece_tokens: Sequence[int], piece_scores: Sequence[float], allowance: int) -> list[bool]:
    """The best-scoring pieces of one unit that fit ``allowance`` (ties: the later first)."""
    return select(piece_tokens, piece_scores, [False] * len(piece_tokens), allowance)


@dataclass(frozen=True)
class KeepHint:
    """What the policy will keep of the units being scored, known before their scores: their
    tokens (the upstream model's tokenizer) and the least allowance they will share (a budget
    leaves less once earlier turns are decided, so the hint holds a lower bound). A scorer reads
    it to skip a pass whose scores cannot change which units are kept."""

    unit_tokens: tuple[int, ...]
    allowance: int


def kept_whatever_the_order(hint: KeepHint, first: Sequence[int]) -> bool:
    """True when units ranked above every other unit, in any order among themselves, are all
    kept: they fit the allowance together. Their order cannot then change the kept set (the walk
    takes them all, and what it does with the rest does not depend on their order)."""
    return sum(hint.unit_tokens[i] for i in first) <= hint.allowance
