"""Aggressive budgets: the best unit that does not fit what is left is kept in part — its best
sentences (lines, items) with the gaps told — rather than skipped for smaller, worse units."""

from __future__ import annotations

import asyncio
import json

from ccproxy.adapters import chat as chat_wire
from ccproxy.compression.pipeline import compress_wire
from ccproxy.compression.policy import MIN_PIECE_ALLOWANCE, finish_walk, walk
from ccproxy.compression.units import ELLIPSIS, partial_text, pieces_of
from ccproxy.lossless.markers import Marking
from ccproxy.retrieval import RetrievalStore
from tests.unit.test_pipeline import overlap_score, plan, words

QUESTION = "When was the zurich treaty signed by the delegates?"
GOLD = (
    "The zurich treaty has a long history of drafts and revisions. "
    "Many clerks copied it by hand over several winters. "
    "The zurich treaty was signed by the delegates in 1921. "
    "Its original paper is now kept in a museum basement. "
    "Visitors may see a replica on weekdays only."
)


def _chat() -> list[dict]:
    distractors = [f"Short note {k} about gardening tools and soil." for k in range(6)]
    body = "\n\n".join([distractors[0], distractors[1], GOLD, *distractors[2:]])
    return [{"role": "user", "content": f"{body}\n\n{QUESTION}"}]


def _run(messages, budget=None, ratio=None, elide=None):
    options = {"threshold_tokens": 0, "ratio": ratio, "budget_tokens": budget}
    return asyncio.run(compress_wire(chat_wire.FORMAT, messages, plan(**options), count_tokens=words,
                                     score=overlap_score, elide=elide))


def test_a_unit_larger_than_the_allowance_yields_its_best_sentences() -> None:
    messages = _chat()
    gold_words = len(GOLD.split())
    question_words = len(QUESTION.split())
    budget = question_words + gold_words // 2  # the gold paragraph cannot fit whole
    result = _run(messages, budget=budget)
    sent = result.forwarded[0]["content"]
    assert "signed by the delegates in 1921." in sent  # its best sentence
    assert "gardening" not in sent  # not the smaller, worse units
    assert ELLIPSIS in sent  # the reader is told text was cut
    assert result.tokens_after <= budget  # a budget is still a cap, the marker counted
    kept = [u for u in result.units if u.kept and not u.protected]
    assert len(kept) == 1 and kept[0].partly and kept[0].kept_tokens < kept[0].tokens


def test_without_the_descent_the_same_budget_kept_only_worse_units() -> None:
    """The walk itself: the gold unit is the best and too large; select would skip it."""
    tokens = [8, 8, 41, 8]
    scores = [0.1, 0.2, 0.9, 0.1]
    stopped = walk(tokens, scores, [False] * 4, 30, can_descend=lambda i: True)
    assert stopped.misfit == 2 and stopped.left == 30 and stopped.keep == [False] * 4
    assert finish_walk(tokens, stopped, 30 - 25) == [False] * 4  # nothing else fits after the pieces
    assert walk(tokens, scores, [False] * 4, 30, can_descend=lambda i: False).keep == [True, True, False, True]
    few = walk(tokens, scores, [False] * 4, MIN_PIECE_ALLOWANCE - 1, can_descend=lambda i: True)
    assert few.misfit is None  # too little left to be worth cutting


def test_lossless_gaps_in_a_partly_kept_unit_are_retrievable() -> None:
    store = RetrievalStore(ttl_s=60, max_entries=100, max_bytes=1 << 20)
    marking = Marking("lossless", "acct", store)
    budget = len(QUESTION.split()) + 30
    result = _run(_chat(), budget=budget, elide=marking)
    sent = result.forwarded[0]["content"]
    assert "1921" in sent and marking.made >= 1
    assert "Visitors may see a replica" not in sent
    assert any("Visitors may see a replica" in (store.get("acct", ref) or "") for ref in _refs(sent))


def _refs(text: str) -> list[str]:
    import re

    return re.findall(r"ccproxy_retrieve id=([0-9a-f]{24})", text)


def test_a_json_group_kept_in_part_is_still_json() -> None:
    from ccproxy.compression.units import segment

    rows = json.dumps([{"k": k, "text": f"row {k} " * 5} for k in range(6)])
    turns = chat_wire.parse([{"role": "user", "content": "Lots of text here to make the turn long. " * 12 + "\n\n" + rows},
                             {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": "which row?"}]).turns
    seg = segment(turns)
    found = [p for p in (pieces_of(seg, u.index) for u in seg.units) if p is not None and p.flavour == "items"]
    assert found
    for pieces in found:
        keep = [k % 2 == 0 for k in range(len(pieces.spans))]
        kept = json.loads(partial_text(pieces, keep))
        expected = [row for text, flag in zip(pieces.texts(), keep) if flag for row in json.loads(f"[{text}]")]
        assert len(pieces.spans) >= 2 and [row for row in kept if isinstance(row, dict)] == expected
        assert kept.count(ELLIPSIS) == len(pieces.spans) // 2  # each gap told, as a JSON string item
