"""bench/conversational.py's scoring of one trace: the needed unit's rank and whether the
product's policy keeps it within each budget."""

from __future__ import annotations

from bench.conversational import Case, evaluate


def test_rank_and_kept_follow_the_scores_and_the_budget() -> None:
    case = Case(trace=None, units=["a", "b", "c", "d"], gold=1, unit_tokens=[50, 10, 30, 10])  # type: ignore[arg-type]
    # Gold second; 10 % of 100 tokens holds only the best unit, 20 % holds the first two.
    assert evaluate(case, [0.1, 0.8, 0.2, 0.9]) == {"rank": 2, "kept": {"10%": False, "20%": True}}
    # Gold first: kept at both budgets.
    assert evaluate(case, [0.1, 0.9, 0.2, 0.3]) == {"rank": 1, "kept": {"10%": True, "20%": True}}
    # A better unit too big for the budget (30 tokens) is skipped, not a stop: gold fits after it.
    assert evaluate(case, [0.1, 0.5, 0.9, 0.2]) == {"rank": 2, "kept": {"10%": True, "20%": True}}
