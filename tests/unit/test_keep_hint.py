"""Passes that cannot change the kept set are not made (issue 18, "no wasted passes"): the policy
tells the scorer what it will keep (``KeepHint``), and the pre-filtered QR-head pass is skipped
when every pre-filtered unit fits. These check that skipping never changes what is kept."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccproxy.adapters.chat import segment_messages as segment
from ccproxy.compression.fused import FusedScorer
from ccproxy.compression.fusion import merge_prefiltered, prefilter
from ccproxy.compression.pipeline import keep_hint
from ccproxy.compression.policy import KeepHint, allowance, kept_whatever_the_order, select
from ccproxy.compression.scoring import ScoreRequest
from tests.unit.test_pipeline import compress_messages, plan, rag_messages, words


class WordTokenizer:
    """Stands in for the QR model's tokenizer: one token per word."""

    def __call__(self, texts, add_special_tokens: bool = False):  # type: ignore[no-untyped-def]
        class Encoded:
            input_ids = [text.split() for text in texts]

        return Encoded()


class ListScorer:
    """Returns the scores it was built with, for the units asked, and counts its calls."""

    def __init__(self, scores_by_text: dict[str, float]) -> None:
        self.scores_by_text = scores_by_text
        self.tokenizer = WordTokenizer()
        self.calls = 0

    def score(self, query: str, units: Sequence[str]) -> list[float]:
        self.calls += 1
        return [self.scores_by_text[u] for u in units]

    def score_batch(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        return [self.score(query, units) for query, units in requests]

    def scores_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        return [[self.scores_by_text[u] for u in units] for _, units in requests]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 40), st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=25),
    st.integers(1, 200),
    st.integers(0, 600),
)
def test_skipping_the_pass_keeps_what_the_pass_would_have_kept(rows, prefilter_tokens, allowed) -> None:
    tokens = [t for t, _, _ in rows]
    dense = [d for _, d, _ in rows]
    qr = [q for _, _, q in rows]
    kept = prefilter(dense, prefilter_tokens, tokens)
    hint = KeepHint(tuple(tokens), allowed)
    if not kept_whatever_the_order(hint, kept):
        return
    protected = [False] * len(rows)
    with_pass = select(tokens, merge_prefiltered(dense, kept, [qr[i] for i in kept]), protected, allowed)
    without = select(tokens, merge_prefiltered(dense, kept, [dense[i] for i in kept]), protected, allowed)
    assert with_pass == without


def _fused(mode: str, n: int) -> tuple[FusedScorer, ListScorer, list[str]]:
    units = [" ".join(f"w{k}x{j}" for j in range(10)) for k in range(n)]  # 10 tokens each
    qr = ListScorer({u: float(k % 3) for k, u in enumerate(units)})
    dense = ListScorer({u: float(k) for k, u in enumerate(units)})
    return FusedScorer(qr, dense, mode, prefilter_tokens=30), qr, units  # type: ignore[arg-type]


def test_the_prefiltered_pass_is_skipped_only_when_its_units_fit() -> None:
    fused, qr, units = _fused("fusion-prefiltered", 10)  # 100 tokens; the pre-filter keeps the best 3 (30 tokens)
    fits = KeepHint((10,) * 10, 30)
    scores = fused.score("q", units, fits)
    assert qr.calls == 0 and fused.passes_skipped == 1
    assert sorted(range(10), key=scores.__getitem__)[-3:] == [7, 8, 9]  # the pre-filtered three on top
    fused.score("q", units, KeepHint((10,) * 10, 29))  # one token short: the order matters
    assert qr.calls == 1
    fused.score("q", units)  # no hint: the pass as before
    assert qr.calls == 2


def test_fusion_mode_skips_only_when_everything_fits() -> None:
    fused, qr, units = _fused("fusion", 4)
    fused.score("q", units, KeepHint((10,) * 4, 39))
    assert qr.calls == 1
    fused.score("q", units, KeepHint((10,) * 4, 40))
    assert qr.calls == 1


def test_a_hint_for_other_units_is_refused() -> None:
    fused, _, units = _fused("fusion-prefiltered", 4)
    with pytest.raises(ValueError, match="hint for 3 units"):
        fused.score("q", units, KeepHint((10,) * 3, 40))


def test_the_pipeline_does_not_call_the_scorer_when_everything_fits() -> None:
    calls: list[int] = []

    async def counting(query: str, units: Sequence[str], hint: KeepHint | None = None) -> list[float]:
        calls.append(len(units))
        return [0.0] * len(units)

    result = asyncio.run(compress_messages(rag_messages(), plan(ratio=1.0), count_tokens=words, score=counting))
    assert calls == [] and result.outcome == "compressed" and result.tokens_after == result.tokens_before
    asyncio.run(compress_messages(rag_messages(), plan(ratio=0.9), count_tokens=words, score=counting))
    assert len(calls) == 1


def test_a_budget_hint_is_a_lower_bound_of_the_allowance() -> None:
    segmentation = segment(rag_messages(), protect_system=True)
    tokens = words([u.text for u in segmentation.units])
    protected = [u.protected for u in segmentation.units]
    budget_plan = plan(ratio=None, budget_tokens=300)
    hint = keep_hint(segmentation, tokens, budget_plan, reserved_tokens=50)
    assert hint.allowance == allowance(tokens, protected, budget_tokens=250)
    assert len(hint.unit_tokens) == sum(not p for p in protected)
    assert keep_hint(segmentation, tokens, budget_plan, reserved_tokens=10_000).allowance == 0


def test_score_requests_carry_the_hint_over_the_wire() -> None:
    hint = KeepHint((3, 4), 5)
    request = ScoreRequest.model_validate_json(ScoreRequest.of("q", ["a", "b"], hint).model_dump_json())
    assert request.hint() == hint
    assert ScoreRequest.of("q", ["a"]).hint() is None
    with pytest.raises(ValueError, match="go together"):
        ScoreRequest(query="q", units=["a"], unit_tokens=[1])
    with pytest.raises(ValueError, match="1 unit_tokens for 2 units"):
        ScoreRequest(query="q", units=["a", "b"], unit_tokens=[1], allowance=1)
    with pytest.raises(ValueError):
        ScoreRequest(query="q", units=["a"], unit_tokens=[-1], allowance=1)
