"""BM25 over a request's units (``ccproxy.compression.lexical``): the first stage on huge contexts."""

from __future__ import annotations

import time

import pytest

from ccproxy.compression.lexical import MAX_QUERY_TERMS, bm25_scores, query_terms


def test_a_unit_with_the_rare_query_term_ranks_first() -> None:
    units = [
        "The weather in the city was mild all week.",
        "Error E4711 was raised by the parser when the config file had a tab.",
        "The city council met on Tuesday to discuss the weather.",
    ]
    scores = bm25_scores("Why did the parser raise E4711 on the weather config?", units)
    assert max(range(3), key=scores.__getitem__) == 1


def test_repeating_a_term_saturates_and_long_units_are_normalised() -> None:
    short = "apollo landing"
    padded = "apollo landing " + "filler words about nothing " * 40
    scores = bm25_scores("apollo landing", [short, padded, "unrelated"])
    assert scores[0] > scores[1] > scores[2] == 0.0
    spam = bm25_scores("apollo", ["apollo " * 1000, "apollo mission", "other"])
    assert spam[0] < 2.5 * spam[1]  # a thousand repeats are worth little more than one


def test_a_query_of_stopwords_or_nothing_scores_every_unit_zero() -> None:
    assert bm25_scores("what is the", ["the cat", "is it"]) == [0.0, 0.0]
    assert bm25_scores("", ["a", "b"]) == [0.0, 0.0]
    assert bm25_scores("cat", []) == []


def test_the_query_terms_are_capped() -> None:
    query = " ".join(f"term{k}" for k in range(5 * MAX_QUERY_TERMS))
    terms = query_terms(query)
    assert len(terms) == MAX_QUERY_TERMS and "term0" in terms


@pytest.mark.parametrize("text", ["a" * 4_000_000, "a." * 2_000_000, "汉字" * 1_000_000, "word " * 800_000])
def test_the_scan_is_linear_on_hostile_text(text: str) -> None:
    started = time.perf_counter()
    bm25_scores("a word", [text, "a word here"])
    assert time.perf_counter() - started < 3.0
