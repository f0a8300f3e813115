"""A benchmark's recorded command carries the scorer settings it ran with (bench.compressor_bench.scorer_env)."""

from __future__ import annotations

from bench.compressor_bench import scorer_env
from ccproxy.settings import Settings


def test_only_the_scorer_settings_that_differ_from_the_defaults_are_recorded() -> None:
    assert scorer_env(Settings()) == ""
    assert scorer_env(Settings(scoring_head_set="smollm2-135m-instruct-fast", scoring_window_tokens=2560,
                               scoring_window_overlap_tokens=0)) == (
        "CCPROXY_SCORING_HEAD_SET=smollm2-135m-instruct-fast CCPROXY_SCORING_WINDOW_TOKENS=2560 "
        "CCPROXY_SCORING_WINDOW_OVERLAP_TOKENS=0 ")
    assert scorer_env(Settings(scoring_head_set="a b")) == "CCPROXY_SCORING_HEAD_SET='a b' "


def test_the_recorded_settings_are_read_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CCPROXY_SCORING_WINDOW_TOKENS", "3072")
    assert scorer_env(Settings()) == "CCPROXY_SCORING_WINDOW_TOKENS=3072 "
