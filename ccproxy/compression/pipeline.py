"""One compression, start to end, in one straight line:

    parse (adapter) -> segment into turn segments -> memo look-up -> score the misses (batched)
    -> select -> edits -> memo store -> render (adapter)

The scorer and the token counter are passed in, so the same code runs in the Gateway (scores
from the Compressor service), in ``ccproxy.compress`` (scores in-process) and in benchmarks.
With a memo the conversation is decided turn segment by turn segment, append-only
(``ccproxy.compression.history`` holds that policy); without one, as a single segment against
the current question (``rescore``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Generic, Literal, Protocol, TypeVar

from ccproxy.compression.conversation import Conversation, Edits, TurnEdit, WireFormat
from ccproxy.compression.history import HistoryMemo, SegmentDecision, is_agent_step, memo_key, task_before, turn_bounds
from ccproxy.compression.offload import Offload, inline
from ccproxy.compression.policy import (
    KeepHint,
    allowance,
    finish_walk,
    kept_whatever_the_order,
    pick_pieces,
    should_compress,
    walk,
)
from ccproxy.compression.units import (
    AgentStep,
    Elide,
    Pieces,
    Segmentation,
    Unit,
    UnitKind,
    atom_texts,
    edits,
    partial_text,
    pieces_of,
    segment,
)
from ccproxy.tokens import TokenCounter

T = TypeVar("T")
P = TypeVar("P")


class Scorer(Protocol):
    """One relevance score per unit text, higher = more relevant to the query. ``hint``: what the
    policy will keep of these units (policy.KeepHint), for a scorer that can skip a pass that
    cannot change the kept set; a scorer is free to ignore it."""

    def __call__(self, query: str, units: Sequence[str], hint: KeepHint | None = None) -> Awaitable[list[float]]: ...


Outcome = Literal["compressed", "disabled", "below_threshold", "nothing_to_drop", "no_query", "too_large", "failed"]
# What becomes of a dropped stretch: it goes (lossy; a tool result says how many lines or items
# went); it is replaced by a marker naming an id the model can retrieve it by, through a tool
# ccproxy answers (lossless); or by a marker pointing at GET /v1/retrieve/{id} (citation).
Mode = Literal["lossy", "lossless", "citation"]
MODES: tuple[Mode, ...] = ("lossy", "lossless", "citation")
# A conversation this worker has not seen has every turn to score. Sent all at once, a long one
# queues whole at the Compressor, which goes on scoring it after the Gateway has given up on it
# (CCPROXY_COMPRESSOR_TIMEOUT_S) and delays everyone else's requests; with a bounded fan-out at
# most this many are left behind. 16 fills one batch at the default CCPROXY_COMPRESSOR_MAX_BATCH_SIZE.
SEGMENTS_IN_FLIGHT = 16


@dataclass(frozen=True)
class Execution:
    """Where the CPU-heavy steps of one compression run and how far segmentation may go."""

    offload: Offload = inline
    size_chars: int = 0  # the request's size, which decides whether ``offload`` uses a thread
    max_units: int | None = None  # units.TooManyUnits beyond this

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
    # Agent steps of the turn in progress (history.turn_bounds): tool results of at least this
    # many characters are compressed against the task; None: the turn in progress is kept whole.
    tool_result_min_chars: int | None = None
    keep_newest_tool_result: bool = True
    mode: Mode = "lossy"
    # The best unit that does not fit is kept in part (its best sentences) rather than skipped.
    partial_units: bool = True


@dataclass(frozen=True)
class UnitReport:
    index: int
    kind: UnitKind
    tokens: int  # the unit's size
    protected: bool
    kept: bool  # any of it: whole, or in part (its best pieces, when it did not fit)
    score: float | None  # None for units that were not scored (protected ones)
    kept_tokens: int  # what is forwarded of it: ``tokens`` kept whole, fewer kept in part, 0 dropped
    # For the demo page only (ccproxy/demo.py), never in an API answer, a log or the database:
    # the unit's text and its turn's place in the conversation.
    text: str = field(default="", repr=False, compare=False)
    turn: int = -1

    @property
    def partly(self) -> bool:
        return self.kept and self.kept_tokens != self.tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "tokens": self.tokens,
            "kept_tokens": self.kept_tokens,
            "protected": self.protected,
            "kept": self.kept,
            "score": self.score,
        }


@dataclass(frozen=True)
class Compression(Generic[P]):
    forwarded: P  # the conversation as forwarded, in its wire format (chat: the messages list)
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
    # A unit kept in part (it did not fit): (unit, a keep flag per piece, tokens of what is kept).
    # Flags, not text: the text is rebuilt on each request, so its markers are kept again.
    partial: tuple[tuple[int, tuple[bool, ...], int], ...] = ()


@dataclass(frozen=True)
class Decided:
    """The core's answer, before rendering: per turn, what changes (None: nothing does)."""

    edits: Edits | None
    outcome: Outcome
    tokens_before: int
    tokens_after: int
    units: tuple[UnitReport, ...]


def keep_everything(units: Sequence[Unit], outcome: Outcome) -> Decision:
    return Decision(outcome, (True,) * len(units), (None,) * len(units))


def skipped(segmentation: Segmentation, tokens: Sequence[int], plan: CompressionPlan, context_tokens: int) -> Outcome | None:
    """Why these units are forwarded untouched, or None when they are to be scored.
    ``context_tokens`` is what the threshold compares (the conversation up to these units)."""
    if not plan.enabled:
        return "disabled"
    if not should_compress(context_tokens, plan.threshold_tokens):
        return "below_threshold"
    if all(unit.protected for unit in segmentation.units):
        return "nothing_to_drop"
    if not segmentation.query.strip():
        # No question to rank against (the user turn holds only images, or no user turn yet):
        # every unit would score the same noise, so nothing is dropped.
        return "no_query"
    return None


def keep_hint(segmentation: Segmentation, tokens: Sequence[int], plan: CompressionPlan, reserved_tokens: int) -> KeepHint:
    """What the policy will keep of the droppable units: their tokens and the least allowance
    ``choose_deep`` can have, with ``reserved_tokens`` an upper bound of what it reserves."""
    units = segmentation.units
    protected = [unit.protected for unit in units]
    budget = None if plan.budget_tokens is None else max(0, plan.budget_tokens - reserved_tokens)
    least = allowance(tokens, protected, ratio=plan.ratio, budget_tokens=budget)
    return KeepHint(tuple(n for n, p in zip(tokens, protected) if not p), least)


async def score_units(segmentation: Segmentation, score: Scorer, hint: KeepHint | None = None) -> list[float]:
    """One score per unit: the scorer's for the droppable ones, 0.0 for the protected ones.
    When the hint says every droppable unit is kept whatever its score, the scorer is not called."""
    units = segmentation.units
    droppable = [i for i, unit in enumerate(units) if not unit.protected]
    if hint is not None and kept_whatever_the_order(hint, range(len(droppable))):
        droppable_scores = [0.0] * len(droppable)
    else:
        droppable_scores = await score(segmentation.query, [units[i].text for i in droppable], hint)
    scores = [0.0] * len(units)
    for i, value in zip(droppable, droppable_scores, strict=True):
        scores[i] = value
    return scores


async def score_bounded(
    segmentations: Sequence[Segmentation], score: Scorer, in_flight: int, hints: Sequence[KeepHint | None] | None = None
) -> list[list[float]]:
    """``score_units`` of each, in order, with at most ``in_flight`` scorer calls at a time; when
    the caller is cancelled (the compressor timeout), the calls not yet made are never made."""
    gate = asyncio.Semaphore(in_flight)
    hints = [None] * len(segmentations) if hints is None else hints

    async def one(segmentation: Segmentation, hint: KeepHint | None) -> list[float]:
        async with gate:
            return await score_units(segmentation, score, hint)

    return list(await asyncio.gather(*(one(s, h) for s, h in zip(segmentations, hints, strict=True))))


async def choose_deep(
    segmentation: Segmentation,
    tokens: Sequence[int],
    scores: Sequence[float],
    plan: CompressionPlan,
    reserved_tokens: int,
    score: Scorer,
    count_tokens: TokenCounter,
    elide: Elide | None,
) -> Decision:
    """``choose``, but the best unit that does not fit what is left is not skipped whole: its
    best pieces (sentences, lines, items, definitions) that fit are kept, told gaps and all,
    before lower-ranked whole units get the rest (aggressive budgets). One unit per segment is
    cut, with one more scorer call over its pieces."""
    units = segmentation.units
    protected = [unit.protected for unit in units]
    budget = None if plan.budget_tokens is None else max(0, plan.budget_tokens - reserved_tokens)
    allowed = allowance(tokens, protected, ratio=plan.ratio, budget_tokens=budget)
    found: dict[int, Pieces] = {}
    owned = atom_texts(segmentation) if plan.partial_units else {}

    def can_descend(i: int) -> bool:
        if not plan.partial_units:
            return False
        pieces = pieces_of(segmentation, i, owned)
        if pieces is not None:
            found[i] = pieces
        return pieces is not None

    stopped = walk(tokens, scores, protected, allowed, can_descend)
    unit_scores = tuple(None if unit.protected else s for unit, s in zip(units, scores))
    if stopped.misfit is None:
        return Decision("compressed", tuple(stopped.keep), unit_scores)
    kept_part = await _kept_part(found[stopped.misfit], segmentation.query, stopped.left, score, count_tokens, elide)
    left = stopped.left - (kept_part[1] if kept_part else 0)
    keep = finish_walk(tokens, stopped, left)
    if kept_part is None:
        return Decision("compressed", tuple(keep), unit_scores)
    keep[stopped.misfit] = True
    return Decision("compressed", tuple(keep), unit_scores, ((stopped.misfit, kept_part[0], kept_part[1]),))


async def _kept_part(
    pieces: Pieces, query: str, left: int, score: Scorer, count_tokens: TokenCounter, elide: Elide | None
) -> tuple[tuple[bool, ...], int] | None:
    """The pieces to keep and the tokens of the text they make (gaps told), within ``left``."""
    texts = pieces.texts()
    piece_scores = await score(query, texts)
    keep = pick_pieces(count_tokens(texts), piece_scores, left)
    # The gaps' ellipses (or markers) take tokens too: drop the weakest piece until it fits.
    while any(keep):
        tokens = count_tokens([partial_text(pieces, keep, elide)])[0]
        if tokens <= left:
            return tuple(keep), tokens
        weakest = min((k for k, flag in enumerate(keep) if flag), key=lambda k: (piece_scores[k], -k))
        keep[weakest] = False
    return None


def unit_reports(
    units: Sequence[Unit], tokens: Sequence[int], decision: Decision, first_index: int = 0, first_turn: int = 0
) -> tuple[UnitReport, ...]:
    """One report per unit; ``first_index`` numbers units after those of earlier segments, whose
    turns come before ``first_turn``."""
    in_part = {unit: kept_tokens for unit, _, kept_tokens in decision.partial}
    return tuple(
        UnitReport(
            first_index + u.index, u.kind, n, u.protected, kept, s, in_part.get(u.index, n) if kept else 0,
            u.text, first_turn + u.message_index,
        )
        for u, n, kept, s in zip(units, tokens, decision.keep, decision.scores)
    )


def framing_tokens(conversation: Conversation, end: int, unit_tokens: int, plan: CompressionPlan, count_tokens: TokenCounter) -> int:
    """Tokens the wire format adds around the units of turns[:end] (role markers, separators,
    the reply priming). A budget caps the prompt the upstream bills, so they are set aside
    first: the original prompt's framing, an upper bound for the compressed one's. 0 without a
    budget, with a counter that counts bare texts only, or a wire format without a chat view."""
    count_prompt = getattr(count_tokens, "count_prompt", None)
    if plan.budget_tokens is None or count_prompt is None or conversation.chat_prefix is None:
        return 0
    return max(0, count_prompt(conversation.chat_prefix(end)) - unit_tokens)


@dataclass
class _Segment:
    start: int
    end: int
    segmentation: Segmentation
    tokens: tuple[int, ...]
    key: Hashable | None  # None: not memoised (a conversation decided as one segment, a live step)
    found: SegmentDecision | None


def _segments(
    conversation: Conversation,
    plan: CompressionPlan,
    count_tokens: TokenCounter,
    memo: HistoryMemo | None,
    max_units: int | None,
    scope: str,
) -> list[_Segment]:
    """Blocking (segmentation, hashing, counting): run through ``Execution``. Each turn segment
    with its memoised decision where there is one; misses are counted here."""
    turns = conversation.turns
    steps = plan.tool_result_min_chars is not None
    bounds = turn_bounds(turns, agent_steps=steps) if memo is not None else [(0, len(turns))]
    if len(bounds) == 1:
        memo = None  # a single segment is the whole request: nothing later resends its decision
    segments = []
    units_left = max_units
    digest = b""
    for k, (start, end) in enumerate(bounds):
        step = None
        if steps and is_agent_step(turns, start, end):
            live = k == len(bounds) - 1 and plan.keep_newest_tool_result
            step = AgentStep(task_before(turns, start), plan.tool_result_min_chars or 0, live)
        # The cap is on the whole request's units, whichever segments they fall in.
        segmentation = segment(turns[start:end], protect_system=plan.protect_system, max_units=units_left, step=step)
        if units_left is not None:
            units_left -= len(segmentation.units)
        key = found = None
        if memo is not None:
            digest, key = memo_key(digest, turns[start:end], (scope, conversation.wire), plan, count_tokens)
            # The step the model is about to read is kept whole for now, not decided: it is
            # decided (and memoised) on the next request, when it is no longer the newest.
            found = None if step is not None and step.live else memo.get(key)
            if step is not None and step.live:
                key = None
        tokens = found.tokens if found else tuple(count_tokens([unit.text for unit in segmentation.units]))
        segments.append(_Segment(start, end, segmentation, tokens, key, found))
    return segments


async def decide(
    conversation: Conversation,
    plan: CompressionPlan,
    *,
    count_tokens: TokenCounter,
    score: Scorer,
    execution: Execution = Execution(),
    memo: HistoryMemo | None = None,
    scope: str = "",
    elide: Elide | None = None,
) -> Decided:
    """Every droppable unit decided: with ``memo``, each turn segment against its own question
    and once (``history``); without, the whole conversation against the current question.
    ``scope`` (the account) is part of every memo key: one account's chat never reads
    another's decisions, even for byte-identical messages. ``elide`` tells each dropped stretch
    (``units.edits``); the memo holds decisions, not texts, so it must be deterministic for the
    forwarded history to stay byte-identical from request to request."""
    segments = await execution.run(_segments, conversation, plan, count_tokens, memo, execution.max_units, scope)
    raw_upto = list(accumulate(sum(s.tokens) for s in segments))
    reasons = {
        k: skipped(s.segmentation, s.tokens, plan, raw_upto[k]) for k, s in enumerate(segments) if s.found is None
    }
    # The framing up to the end of segment k; the last one's is the whole request's, which the
    # budget check below needs again, so each is counted once.
    framing_upto: dict[int, int] = {}

    async def framing_through(k: int) -> int:
        if k not in framing_upto:
            framing_upto[k] = await execution.run(
                framing_tokens, conversation, segments[k].end, raw_upto[k], plan, count_tokens
            )
        return framing_upto[k]

    # Scoring a segment needs nothing from the others, so the misses (every segment, on a worker
    # that has not seen this chat) go to the scorer together, where they can share a batch. Each
    # goes with what the policy will keep of it at least: whatever earlier segments keep, they
    # keep no more than they hold.
    to_score = [k for k, reason in reasons.items() if reason is None]
    hints = [
        keep_hint(segments[k].segmentation, segments[k].tokens, plan, (raw_upto[k - 1] if k else 0) + await framing_through(k))
        for k in to_score
    ]
    scored = dict(zip(to_score, await score_bounded(
        [segments[k].segmentation for k in to_score], score, SEGMENTS_IN_FLIGHT, hints
    )))

    reports: list[UnitReport] = []
    kept_total = 0
    outcomes: list[Outcome] = []
    decisions: list[Decision] = []
    for k, s in enumerate(segments):
        if s.found is None:
            reason = reasons[k]
            if reason is not None:
                decision = keep_everything(s.segmentation.units, reason)
            else:
                # A budget counts what was decided before as protected (the history's forms are
                # fixed) and the framing up to this segment only, so that the decision never
                # depends on later turns.
                decision = await choose_deep(
                    s.segmentation, s.tokens, scored[k], plan, kept_total + await framing_through(k), score,
                    count_tokens, elide,
                )
            s.found = SegmentDecision(decision, s.tokens)
            if memo is not None and s.key is not None:
                await execution.run(memo.put, s.key, s.found)  # a shared memo writes over the network
        decisions.append(s.found.decision)
        reports.extend(
            unit_reports(s.segmentation.units, s.tokens, s.found.decision, first_index=len(reports), first_turn=s.start)
        )
        kept_total += s.found.kept_tokens
        outcomes.append(s.found.decision.outcome)

    raw_total = raw_upto[-1] if raw_upto else 0
    if "compressed" not in outcomes:
        # The threshold is on the raw conversation so far, so the newest segment says why.
        return Decided(None, outcomes[-1] if outcomes else "nothing_to_drop", raw_total, raw_total, tuple(reports))
    over_budget = plan.budget_tokens is not None and kept_total + await framing_through(len(segments) - 1) > plan.budget_tokens
    if len(segments) > 1 and over_budget:
        # The history's stable form leaves no room for the budget: this one request is decided
        # whole (the provider's cache misses once; the budget holds).
        return await decide(conversation, plan, count_tokens=count_tokens, score=score, execution=execution, elide=elide)
    changes = await execution.run(_edits, segments, decisions, elide)
    return Decided(changes, "compressed", raw_total, kept_total, tuple(reports))


def _edits(segments: Sequence[_Segment], decisions: Sequence[Decision], elide: Elide | None) -> Edits:
    changes: list[TurnEdit | None] = []
    for s, decision in zip(segments, decisions):
        partial = {unit: flags for unit, flags, _ in decision.partial}
        changes.extend(edits(s.segmentation, decision.keep, elide, partial))
    return tuple(changes)


async def compress_wire(
    wire: WireFormat[P],
    payload: P,
    plan: CompressionPlan,
    *,
    count_tokens: TokenCounter,
    score: Scorer,
    execution: Execution = Execution(),
    memo: HistoryMemo | None = None,
    scope: str = "",
    elide: Elide | None = None,
) -> Compression[P]:
    """``decide`` on the adapter's view of ``payload``, rendered back into its wire format."""
    conversation = await execution.run(wire.parse, payload)
    decided = await decide(
        conversation, plan, count_tokens=count_tokens, score=score, execution=execution, memo=memo, scope=scope,
        elide=elide,
    )
    return await render_decided(wire, payload, decided, execution)


async def render_decided(wire: WireFormat[P], payload: P, decided: Decided, execution: Execution) -> Compression[P]:
    forwarded = payload if decided.edits is None else await execution.run(wire.render, payload, decided.edits)
    return Compression(forwarded, decided.outcome, decided.tokens_before, decided.tokens_after, decided.units)


def plan_for(
    *,
    enabled: bool | None,
    ratio: float | None,
    budget_tokens: int | None,
    default_enabled: bool,
    default_ratio: float,
    threshold_tokens: int,
    protect_system: bool,
    tool_result_min_chars: int | None = None,
    keep_newest_tool_result: bool = True,
    mode: Mode = "lossy",
    partial_units: bool = True,
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
        tool_result_min_chars=tool_result_min_chars,
        keep_newest_tool_result=keep_newest_tool_result,
        mode=mode,
        partial_units=partial_units,
    )
