"""One compression, start to end: messages -> units -> scores -> kept units -> messages.

The scorer and the token counter are passed in, so the same code runs in the Gateway (scores
from the Compressor service), in ``ccproxy.compress`` (scores in-process) and in benchmarks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ccproxy.compression.offload import Offload, inline
from ccproxy.compression.policy import allowance, select, should_compress
from ccproxy.compression.units import Segmentation, Unit, UnitKind, rebuild, segment
from ccproxy.tokens import TokenCounter

T = TypeVar("T")
Scorer = Callable[[str, Sequence[str]], Awaitable[list[float]]]
Outcome = Literal["compressed", "disabled", "below_threshold", "nothing_to_drop", "too_large", "failed"]


@dataclass(frozen=True)
class Execution:
    """Where the CPU-heavy steps of one compression run and how far segmentation may go."""

    offload: Offload = inline
    size_chars: int = 0  # the request's size, which decides whether ``offload`` uses a thread
    max_units: int | None = None  # units.TooManyUnits beyond this

    def segment_and_count(
        self, messages: list[dict[str, Any]], plan: CompressionPlan, count_tokens: TokenCounter
    ) -> tuple[Segmentation, list[int]]:
        """Blocking: segmentation and its unit token counts (call through ``run``)."""
        segmentation = segment(messages, protect_system=plan.protect_system, max_units=self.max_units)
        return segmentation, list(count_tokens([unit.text for unit in segmentation.units]))

    def run(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]:
        return self.offload(self.size_chars, fn, *args)


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


@dataclass(frozen=True)
class Decision:
    """What compression decided for one segmentation: an outcome and a keep flag per unit."""

    outcome: Outcome
    keep: tuple[bool, ...]
    scores: tuple[float | None, ...]  # None for units that were not scored (protected ones)


def keep_everything(units: Sequence[Unit], outcome: Outcome) -> Decision:
    return Decision(outcome, (True,) * len(units), (None,) * len(units))


def skipped(
    segmentation: Segmentation, tokens: Sequence[int], plan: CompressionPlan, context_tokens: int | None = None
) -> Outcome | None:
    """Why these units are forwarded untouched, or None when they are to be scored.
    ``context_tokens`` is what the threshold compares (default: these units' tokens)."""
    if not plan.enabled:
        return "disabled"
    if not should_compress(sum(tokens) if context_tokens is None else context_tokens, plan.threshold_tokens):
        return "below_threshold"
    if all(unit.protected for unit in segmentation.units):
        return "nothing_to_drop"
    return None


async def score_units(segmentation: Segmentation, score: Scorer) -> list[float]:
    """One score per unit: the scorer's for the droppable ones, 0.0 for the protected ones."""
    units = segmentation.units
    droppable = [i for i, unit in enumerate(units) if not unit.protected]
    droppable_scores = await score(segmentation.query, [units[i].text for i in droppable])
    scores = [0.0] * len(units)
    for i, value in zip(droppable, droppable_scores, strict=True):
        scores[i] = value
    return scores


def choose(
    segmentation: Segmentation,
    tokens: Sequence[int],
    scores: Sequence[float],
    plan: CompressionPlan,
    reserved_tokens: int = 0,
) -> Decision:
    """The kept units under the plan. ``reserved_tokens`` lie outside these units but count
    against a budget as if protected: the chat framing, and in a multi-turn chat the earlier
    turns' forwarded forms."""
    units = segmentation.units
    protected = [unit.protected for unit in units]
    budget = None if plan.budget_tokens is None else max(0, plan.budget_tokens - reserved_tokens)
    keep = select(tokens, scores, protected, allowance(tokens, protected, ratio=plan.ratio, budget_tokens=budget))
    return Decision(
        "compressed",
        tuple(keep),
        tuple(None if unit.protected else s for unit, s in zip(units, scores)),
    )


def unit_reports(
    units: Sequence[Unit], tokens: Sequence[int], decision: Decision, first_index: int = 0
) -> tuple[UnitReport, ...]:
    """One report per unit; ``first_index`` numbers units after those of earlier segments."""
    return tuple(
        UnitReport(first_index + u.index, u.kind, n, u.protected, kept, s)
        for u, n, kept, s in zip(units, tokens, decision.keep, decision.scores)
    )


def framing_tokens(
    messages: list[dict[str, Any]], unit_tokens: int, plan: CompressionPlan, count_tokens: TokenCounter
) -> int:
    """Tokens the chat format adds around the units (role markers, separators, the reply
    priming). A budget caps the prompt the upstream bills, so they are set aside first: the
    original prompt's framing, an upper bound for the compressed one's. 0 without a budget or
    with a counter that counts bare texts only."""
    count_prompt = getattr(count_tokens, "count_prompt", None)
    if plan.budget_tokens is None or count_prompt is None:
        return 0
    return max(0, count_prompt({"messages": messages}) - unit_tokens)


async def compress_messages(
    messages: list[dict[str, Any]],
    plan: CompressionPlan,
    *,
    count_tokens: TokenCounter,
    score: Scorer,
    execution: Execution = Execution(),
) -> Compression:
    """Every droppable unit of the request decided against its current question."""
    segmentation, tokens = await execution.run(execution.segment_and_count, messages, plan, count_tokens)
    units = segmentation.units
    reason = skipped(segmentation, tokens, plan)
    if reason is None:
        framing = await execution.run(framing_tokens, messages, sum(tokens), plan, count_tokens)
        decision = choose(segmentation, tokens, await score_units(segmentation, score), plan, framing)
    else:
        decision = keep_everything(units, reason)
    reports = unit_reports(units, tokens, decision)
    if decision.outcome != "compressed":
        return Compression(messages, decision.outcome, sum(tokens), sum(tokens), reports)
    kept_tokens = sum(n for n, kept in zip(tokens, decision.keep) if kept)
    forwarded = await execution.run(rebuild, segmentation, decision.keep)
    return Compression(forwarded, "compressed", sum(tokens), kept_tokens, reports)


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
