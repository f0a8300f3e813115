"""Cache-stable compression of a multi-turn chat: history is compressed once, append-only.

Every request of a chat resends the whole history. Deciding all of it again against each new
question (``rescore``) changes the compressed history from turn to turn, and a provider's
prompt cache, which bills a repeated prefix at a 50-90 % discount, then misses. ``stable``
instead splits the chat into *turn segments*, each ending with a user message that the
assistant answered:

* segment k = the messages after the end of segment k-1 up to and including the user message
  that the assistant answered next (consecutive user messages stay together); the
  messages before the first user message (the system prompt) belong to the first segment and
  the messages after the last user message (a tool turn in progress) to the last one;
* segment k is compressed as it was when it was the current turn: its own last user message is
  the question, only its own units may be dropped, and the plan is the request's (ratio per
  segment; the threshold on the raw chat up to and including it; a budget for the whole request
  with the earlier segments' compressed forms counted as protected);
* the forwarded request is the concatenation of the segments' compressed forms.

A decision depends only on the segment, the messages before it and the plan, so request N+1
starts with exactly what request N forwarded (up to N's turn in progress, which moves into the
next segment), and a restarted or different worker reproduces it given the same scores. A small
in-memory LRU memo keyed by a hash of those inputs means a request usually scores only its
newest segment. A budget stays a hard cap: when the history's stable form leaves no room for it,
that one request is compressed with ``rescore`` instead (the cache misses, the budget holds).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from ccproxy.compression.pipeline import (
    Compression,
    CompressionPlan,
    Decision,
    Execution,
    Outcome,
    Scorer,
    UnitReport,
    choose,
    compress_messages,
    framing_tokens,
    keep_everything,
    score_units,
    skipped,
    unit_reports,
)
from ccproxy.compression.units import Segmentation, rebuild, segment
from ccproxy.tokens import TokenCounter

# Segment decisions are small (a flag, a score and a token count per unit). 4,096 of them cover
# the newest segments of a few hundred live chats per worker; an evicted one is recomputed with
# the same result, so the bound trades scoring time, never correctness.
MEMO_ENTRIES = 4096
# A chat this worker has not seen has every turn to score. Sent all at once, a long one queues
# whole at the Compressor, which goes on scoring it after the Gateway has given up on it
# (CCPROXY_COMPRESSOR_TIMEOUT_S) and delays everyone else's requests; with a bounded fan-out at
# most this many are left behind. 16 fills one batch at the default CCPROXY_COMPRESSOR_MAX_BATCH_SIZE.
SEGMENTS_IN_FLIGHT = 16


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def turn_bounds(messages: Sequence[Any]) -> list[tuple[int, int]]:
    """(start, end) of each turn segment. A turn ends with a user message that the assistant
    answered, so consecutive user messages (documents, then the question) stay one turn, and
    whatever follows the last user message (a tool exchange in progress) joins the last turn."""
    last_user = max((i for i, message in enumerate(messages) if _role(message) == "user"), default=-1)
    ends = [
        i + 1
        for i in range(last_user)
        if _role(messages[i]) == "user" and _role(messages[i + 1]) == "assistant"
    ]
    return list(zip([0, *ends], [*ends, len(messages)]))


@dataclass(frozen=True)
class SegmentDecision:
    decision: Decision
    tokens: tuple[int, ...]  # per unit of the segment, as counted when it was decided

    @property
    def kept_tokens(self) -> int:
        return sum(n for n, kept in zip(self.tokens, self.decision.keep) if kept)


class HistoryMemo:
    """A bounded LRU map from a segment's key to its decision; safe to share between threads."""

    def __init__(self, max_entries: int = MEMO_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._entries: OrderedDict[Hashable, SegmentDecision] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> SegmentDecision | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: Hashable, value: SegmentDecision) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)


def chain_digest(previous: bytes, part: Sequence[Any]) -> bytes:
    """A digest of every message up to the end of ``part``, extended one segment at a time.
    Only the digest is kept, never the text."""
    encoded = json.dumps(list(part), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    return hashlib.sha256(previous + encoded.encode("utf-8")).digest()


def counter_identity(count_tokens: TokenCounter) -> str:
    """Which tokenizer counted: budgets and token counts differ between them."""
    name = getattr(count_tokens, "name", None)
    return name if isinstance(name, str) else f"{type(count_tokens).__qualname__}@{id(count_tokens)}"


@dataclass
class _Segment:
    segmentation: Segmentation
    key: Hashable
    found: SegmentDecision | None
    tokens: tuple[int, ...]


async def compress_stable(
    messages: list[dict[str, Any]],
    plan: CompressionPlan,
    *,
    count_tokens: TokenCounter,
    score: Scorer,
    memo: HistoryMemo,
    execution: Execution = Execution(),
    scope: str = "",
) -> Compression:
    """The ``stable`` policy (module docstring); a single-segment chat is exactly ``rescore``.
    ``scope`` (the account) is part of every memo key: one account's chat never reads another's
    decisions, even for byte-identical messages."""
    bounds = turn_bounds(messages)
    if len(bounds) == 1 or not plan.enabled:
        return await compress_messages(messages, plan, count_tokens=count_tokens, score=score, execution=execution)
    segments = await execution.run(_look_up, messages, bounds, plan, count_tokens, memo, execution, scope)
    raw_upto = list(accumulate(sum(s.tokens) for s in segments))
    reasons = {
        k: skipped(s.segmentation, s.tokens, plan, raw_upto[k]) for k, s in enumerate(segments) if s.found is None
    }
    # Scoring a segment needs nothing from the others, so the misses (every segment, on a worker
    # that has not seen this chat) go to the scorer together, where they can share a batch.
    to_score = [k for k, reason in reasons.items() if reason is None]
    scored = await score_bounded([segments[k].segmentation for k in to_score], score, SEGMENTS_IN_FLIGHT)
    scores = dict(zip(to_score, scored))

    # The chat's framing up to the end of turn k; the last turn's is the whole request's, which
    # the budget check below needs again, so each is counted once.
    framing_upto: dict[int, int] = {}

    async def framing_through(k: int) -> int:
        if k not in framing_upto:
            framing_upto[k] = await execution.run(
                framing_tokens, messages[: bounds[k][1]], raw_upto[k], plan, count_tokens
            )
        return framing_upto[k]

    forwarded: list[dict[str, Any]] = []
    reports: list[UnitReport] = []
    kept_total = 0
    outcomes: list[Outcome] = []
    for k, s in enumerate(segments):
        if s.found is None:
            reason = reasons[k]
            if reason is not None:
                decision = keep_everything(s.segmentation.units, reason)
            else:
                # A budget counts what was sent before as protected (the history's forms are
                # fixed) and the framing of the chat up to this turn only, so that the decision
                # never depends on later turns.
                decision = choose(s.segmentation, s.tokens, scores[k], plan, kept_total + await framing_through(k))
            s.found = SegmentDecision(decision, s.tokens)
            memo.put(s.key, s.found)
        reports.extend(unit_reports(s.segmentation.units, s.tokens, s.found.decision, first_index=len(reports)))
        forwarded.extend(await execution.run(rebuild, s.segmentation, s.found.decision.keep))
        kept_total += s.found.kept_tokens
        outcomes.append(s.found.decision.outcome)

    raw_total = raw_upto[-1]
    if "compressed" not in outcomes:
        # The threshold is on the raw chat so far, so the newest segment says why for the request.
        return Compression(messages, outcomes[-1], raw_total, raw_total, tuple(reports))
    if plan.budget_tokens is not None and kept_total + await framing_through(len(segments) - 1) > plan.budget_tokens:
        return await compress_messages(messages, plan, count_tokens=count_tokens, score=score, execution=execution)
    return Compression(forwarded, "compressed", raw_total, kept_total, tuple(reports))


async def score_bounded(segmentations: Sequence[Segmentation], score: Scorer, in_flight: int) -> list[list[float]]:
    """``score_units`` of each, in order, with at most ``in_flight`` scorer calls at a time; when
    the caller is cancelled (the compressor timeout), the calls not yet made are never made."""
    gate = asyncio.Semaphore(in_flight)

    async def one(segmentation: Segmentation) -> list[float]:
        async with gate:
            return await score_units(segmentation, score)

    return list(await asyncio.gather(*(one(s) for s in segmentations)))


def _look_up(
    messages: list[dict[str, Any]],
    bounds: Sequence[tuple[int, int]],
    plan: CompressionPlan,
    count_tokens: TokenCounter,
    memo: HistoryMemo,
    execution: Execution,
    scope: str,
) -> list[_Segment]:
    """Each segment with its memoised decision where there is one; misses are counted here.
    Blocking (segmentation, hashing): the caller runs it through ``execution``."""
    counter = counter_identity(count_tokens)
    digest = b""
    segments = []
    units_left = execution.max_units
    for start, end in bounds:
        part = messages[start:end]
        # The cap is on the whole request's units, whichever segments they fall in.
        segmentation = segment(part, protect_system=plan.protect_system, max_units=units_left)
        if units_left is not None:
            units_left -= len(segmentation.units)
        digest = chain_digest(digest, part)
        key = (scope, digest, plan, counter)
        found = memo.get(key)
        tokens = found.tokens if found else tuple(count_tokens([unit.text for unit in segmentation.units]))
        segments.append(_Segment(segmentation, key, found, tokens))
    return segments
