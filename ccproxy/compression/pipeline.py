"""One compression, start to end: messages -> units -> scores -> kept units -> messages.

The scorer and the token counter are passed in, so the same code runs in the Gateway (scores
from the Compressor service), in ``ccproxy.compress`` (scores in-process) and in benchmarks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ccproxy.compression.policy import allowance, select, should_compress
from ccproxy.compression.units import UnitKind, rebuild, segment
from ccproxy.tokens import TokenCounter

Scorer = Callable[[str, Sequence[str]], Awaitable[list[float]]]
Outcome = Literal["compressed", "disabled", "below_threshold", "nothing_to_drop", "failed"]


@dataclass(frozen=True)
class CompressionPlan:
    """The knobs for one request, after the caller's control and the server's defaults met."""

    enabled: bool
    ratio: float | None
    budget_tokens: int | None
    threshold_tokens: int
    protect_system: bool


@dataclass(frozen=True)
class UnitReport:
    index: int
    kind: UnitKind
    tokens: int
    protected: bool
    kept: bool
    score: float | None  # None for units that were not scored (protected ones)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "tokens": self.tokens,
            "protected": self.protected,
            "kept": self.kept,
            "score": self.score,
        }


@dataclass(frozen=True)
class Compression:
    messages: list[dict[str, Any]]
    outcome: Outcome
    tokens_before: int  # tokens of all units, counted with one tokenizer
    tokens_after: int
    units: tuple[UnitReport, ...]

    @property
    def tokens_saved(self) -> int:
        return self.tokens_before - self.tokens_after


async def compress_messages(
    messages: list[dict[str, Any]],
    plan: CompressionPlan,
    *,
    count_tokens: TokenCounter,
    score: Scorer,
) -> Compression:
    segmentation = segment(messages, protect_system=plan.protect_system)
    units = segmentation.units
    tokens = count_tokens([unit.text for unit in units])
    protected = [unit.protected for unit in units]
    total = sum(tokens)

    def unchanged(outcome: Outcome) -> Compression:
        reports = tuple(
            UnitReport(u.index, u.kind, n, u.protected, True, None) for u, n in zip(units, tokens)
        )
        return Compression(messages, outcome, total, total, reports)

    if not plan.enabled:
        return unchanged("disabled")
    if not should_compress(total, plan.threshold_tokens):
        return unchanged("below_threshold")
    droppable = [i for i, unit in enumerate(units) if not unit.protected]
    if not droppable:
        return unchanged("nothing_to_drop")

    droppable_scores = await score(segmentation.query, [units[i].text for i in droppable])
    scores: list[float] = [0.0] * len(units)
    for i, value in zip(droppable, droppable_scores, strict=True):
        scores[i] = value
    keep = select(
        tokens,
        scores,
        protected,
        allowance(tokens, protected, ratio=plan.ratio, budget_tokens=plan.budget_tokens),
    )
    reports = tuple(
        UnitReport(u.index, u.kind, n, u.protected, kept, None if u.protected else s)
        for u, n, kept, s in zip(units, tokens, keep, scores)
    )
    kept_tokens = sum(n for n, kept in zip(tokens, keep) if kept)
    return Compression(rebuild(segmentation, keep), "compressed", total, kept_tokens, reports)


def plan_for(
    *,
    enabled: bool | None,
    ratio: float | None,
    budget_tokens: int | None,
    default_enabled: bool,
    default_ratio: float,
    threshold_tokens: int,
    protect_system: bool,
) -> CompressionPlan:
    """The caller's choices where it made them, the server's defaults elsewhere."""
    if ratio is None and budget_tokens is None:
        ratio = default_ratio
    return CompressionPlan(
        enabled=default_enabled if enabled is None else enabled,
        ratio=ratio,
        budget_tokens=budget_tokens,
        threshold_tokens=threshold_tokens,
        protect_system=protect_system,
    )
