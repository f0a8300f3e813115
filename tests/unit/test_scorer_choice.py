"""Which scorer the Compressor loads: never a model without a head set (issue 18)."""

from __future__ import annotations

import pytest

from ccproxy.compression.heads import load_head_set, read_head_set
from ccproxy.compression.model import EMBEDDED_NAME
from ccproxy.compression.scoring import NoHeadSet, chosen_heads, load_scorer, scoring_source
from ccproxy.settings import Settings


def test_the_default_is_the_embedded_model_with_its_shipped_heads_on_any_device() -> None:
    assert scoring_source(Settings()) is None  # the embedded SmolLM2, with or without CUDA
    heads, weights = chosen_heads(Settings(), EMBEDDED_NAME, None)
    assert heads == load_head_set(EMBEDDED_NAME) and heads
    assert weights is None or len(weights) == len(heads)


def test_a_model_without_a_head_set_is_refused_before_its_weights_load() -> None:
    # The check comes first: without it this would try to download 14 GB from the hub.
    with pytest.raises(NoHeadSet, match=r"mistral-7b-instruct-v0\.2.*training\.detect_heads"):
        load_scorer(Settings(scoring_model="mistralai/Mistral-7B-Instruct-v0.2"))


def test_a_head_set_name_that_names_no_file_is_refused() -> None:
    with pytest.raises(NoHeadSet, match="CCPROXY_SCORING_HEAD_SET='no-such-set'"):
        chosen_heads(Settings(scoring_head_set="no-such-set"), EMBEDDED_NAME, None)
    heads, _ = chosen_heads(Settings(scoring_head_set=EMBEDDED_NAME), "any-model", None)
    assert heads == load_head_set(EMBEDDED_NAME)


def test_the_weighted_hard_distractor_set_is_one_setting_away() -> None:
    # training/fit_head_weights.py --out ccproxy/compression/heads/smollm2-135m-instruct-hard.json
    heads, weights = chosen_heads(Settings(scoring_head_set="smollm2-135m-instruct-hard"), EMBEDDED_NAME, None)
    assert heads and weights is not None and len(weights) == len(heads)
    assert all(w >= 0 for w in weights) and sum(weights) / len(weights) == pytest.approx(1.0, abs=1e-3)
    assert max(layer for layer, _ in heads) <= 15  # shallower than the shipped set: fewer layers run


def test_the_set_detected_on_agent_traces_too_is_one_setting_away() -> None:
    # training/fit_head_weights.py --trace-items ... --out ccproxy/compression/heads/smollm2-135m-instruct-mixed.json
    heads, weights = chosen_heads(Settings(scoring_head_set="smollm2-135m-instruct-mixed"), EMBEDDED_NAME, None)
    assert heads and weights is not None and len(weights) == len(heads)
    assert all(w >= 0 for w in weights) and sum(weights) / len(weights) == pytest.approx(1.0, abs=1e-3)
    data = read_head_set("smollm2-135m-instruct-mixed")
    assert "agent traces" in data["detected_on"] and set(data["report"]["held_out_by_source"]) == {"hard", "traces"}


def test_the_shallow_set_runs_nine_layers_and_drops_its_zero_weight_head() -> None:
    # training/fit_head_weights.py --max-layer 11 --depths 7 8 11 --trace-items ...
    #     --out ccproxy/compression/heads/smollm2-135m-instruct-fast.json
    data = read_head_set("smollm2-135m-instruct-fast")
    assert max(layer for layer, _ in data["heads"]) <= 8 and "depth in [7, 8, 11]" in data["source"]
    heads, weights = chosen_heads(Settings(scoring_head_set="smollm2-135m-instruct-fast"), EMBEDDED_NAME, None)
    assert weights is not None and all(w >= 0 for w in weights)
    # the scorer computes only the heads of non-zero weight (QRHeadScorer), so the model runs up to layer 8
    assert max(layer for (layer, _), w in zip(heads, weights) if w > 0) == 8


@pytest.mark.parametrize(("old", "new"), [
    ("off", "qrhead"), ("prefilter", "qrhead-prefiltered"), ("fusion", "fusion"),
    ("both", "fusion-prefiltered"), ("only", "dense"),
])
def test_scoring_modes_are_named_for_what_scores_and_the_old_names_still_read(
    monkeypatch: pytest.MonkeyPatch, old: str, new: str
) -> None:
    assert Settings().scoring_mode == "fusion-prefiltered"
    monkeypatch.setenv("CCPROXY_SCORING_DENSE", old)
    assert Settings().scoring_mode == new
    monkeypatch.setenv("CCPROXY_SCORING_MODE", "dense")  # the new name wins over the old one
    assert Settings().scoring_mode == "dense"
    monkeypatch.delenv("CCPROXY_SCORING_DENSE")
    monkeypatch.setenv("CCPROXY_SCORING_MODE", "both")
    assert Settings().scoring_mode == "fusion-prefiltered"
    monkeypatch.setenv("CCPROXY_SCORING_MODE", "fast")
    with pytest.raises(ValueError, match="scoring_mode|CCPROXY_SCORING_MODE"):
        Settings()


def test_a_window_too_small_for_the_capped_query_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="scoring_window_tokens"):
        Settings(scoring_window_tokens=512)
    with pytest.raises(ValueError, match="scoring_window_overlap_tokens"):
        Settings(scoring_window_overlap_tokens=-1)
