"""The ``stable`` history policy: a multi-turn conversation is compressed once, append-only.

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

This module holds the policy (where segments end, the memo and its keys); the one path that
applies it is ``ccproxy.compression.pipeline.decide``. Turns, not messages: the same holds for
Responses items and Messages blocks.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ccproxy.compression.conversation import Turn
from ccproxy.tokens import TokenCounter

if TYPE_CHECKING:
    from ccproxy.compression.pipeline import CompressionPlan, Decision

# Segment decisions are small (a flag, a score and a token count per unit). 4,096 of them cover
# the newest segments of a few hundred live chats per worker; an evicted one is recomputed with
# the same result, so the bound trades scoring time, never correctness.
MEMO_ENTRIES = 4096


def turn_bounds(turns: Sequence[Turn], agent_steps: bool = False) -> list[tuple[int, int]]:
    """(start, end) of each turn segment. A turn ends with a user turn that the assistant
    answered, so consecutive user turns (documents, then the question) stay one segment, and
    whatever follows the last user turn (a tool exchange in progress) joins the last one.

    ``agent_steps``: the turn in progress is cut too, into agent steps, each an assistant turn
    and the tool results that answer it, so that each step is decided once, when the model has
    read it, and resent as decided on every later step."""
    last_user = max((i for i, turn in enumerate(turns) if turn.role == "user"), default=-1)
    ends = [
        i + 1
        for i in range(len(turns) - 1)
        if turns[i + 1].role == "assistant"
        and (
            (i < last_user and turns[i].role == "user")
            or (agent_steps and i >= last_user >= 0 and turns[i].role in ("user", "tool"))
        )
    ]
    return list(zip([0, *ends], [*ends, len(turns)]))


def is_agent_step(turns: Sequence[Turn], start: int, end: int) -> bool:
    """Whether turns[start:end] is an agent step: it opens with tool calls and holds no user turn."""
    first = turns[start]
    return (
        start > 0 and first.role == "assistant" and bool(first.calls)
        and all(turn.role != "user" for turn in turns[start:end])
    )


def task_before(turns: Sequence[Turn], start: int) -> str:
    """The text of the last user turn before ``start``: what the agent was asked to do."""
    for turn in reversed(turns[:start]):
        if turn.role == "user":
            return turn.text
    return ""


@dataclass(frozen=True)
class SegmentDecision:
    decision: Decision
    tokens: tuple[int, ...]  # per unit of the segment, as counted when it was decided

    @property
    def kept_tokens(self) -> int:
        """Tokens forwarded of these units: whole kept units, and what is kept of a unit kept in part."""
        in_part = {unit: tokens for unit, _, tokens in self.decision.partial}
        return sum(in_part.get(i, n) for i, (n, kept) in enumerate(zip(self.tokens, self.decision.keep)) if kept)


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


def chain_digest(previous: bytes, part: Sequence[Turn]) -> bytes:
    """A digest of every turn up to the end of ``part``, extended one segment at a time, over
    the wire JSON the turns came from. Only the digest is kept, never the text."""
    sources = [turn.source for turn in part]
    encoded = json.dumps(sources, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    return hashlib.sha256(previous + encoded.encode("utf-8")).digest()


def counter_identity(count_tokens: TokenCounter) -> str:
    """Which tokenizer counted: budgets and token counts differ between them."""
    name = getattr(count_tokens, "name", None)
    return name if isinstance(name, str) else f"{type(count_tokens).__qualname__}@{id(count_tokens)}"


def memo_key(
    previous: bytes, part: Sequence[Turn], scope: Hashable, plan: CompressionPlan, count_tokens: TokenCounter
) -> tuple[bytes, Hashable]:
    """(the chain digest through ``part``; the memo key of its decision). A decision depends on
    the turns up to it, the plan and the tokenizer; ``scope`` keeps accounts and wire formats
    apart."""
    digest = chain_digest(previous, part)
    return digest, (scope, digest, plan, counter_identity(count_tokens))
