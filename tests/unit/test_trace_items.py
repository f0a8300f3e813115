"""Head-detection items from agent traces (bench/trace_items.py): from training data only, the
needed result always kept, and the conversational benchmark's needles left out."""

from __future__ import annotations

import json

from bench.agent_traces import build_traces
from bench.trace_items import fit_window, main, trace_items
from nqdata.items import load_records


def words(text: str) -> int:
    return len(text.split())


def test_fit_window_drops_the_oldest_units_but_never_the_gold() -> None:
    assert fit_window([10, 10, 10], gold=0, max_tokens=30) == 0
    assert fit_window([10, 20, 5, 5], gold=2, max_tokens=12) == 2
    assert fit_window([10, 20, 5, 5], gold=1, max_tokens=12) == -1  # the gold and what follows: 30 tokens
    assert fit_window([50, 5], gold=1, max_tokens=5) == 1


def test_items_come_from_training_data_fit_the_window_and_keep_the_needed_result() -> None:
    traces = {trace.number: trace for trace in build_traces(6, 6, 10, 1018, nq_part="train")}
    items = trace_items(6, seed=1018, min_steps=6, max_steps=10, count_tokens=words, max_tokens=2000)
    assert len(items) >= 4 and {item["kind"] for item in items} == {"coding", "research"}
    assert any(len(item["units"]) < len(traces[item["number"]].steps) for item in items)  # some were cut
    training_questions = {r.question for r in load_records("train")}
    evaluation_questions = {r.question for r in load_records("eval")}
    for item in items:
        trace = traces[item["number"]]
        assert sum(words(unit) for unit in item["units"]) <= 2000
        assert [k for k, unit in enumerate(item["units"]) if trace.needle in unit] == [item["gold"]]
        assert item["units"] == [step.output for step in trace.steps][-len(item["units"]):]  # the newest kept
        if item["kind"] == "research":
            asked = item["question"].removeprefix("Before I publish: ").split("? Answer from")[0]
            assert asked in training_questions and asked not in evaluation_questions


def test_excluded_needles_are_left_out() -> None:
    traces = build_traces(6, 6, 10, 1018, nq_part="train")
    fewer = trace_items(6, seed=1018, min_steps=6, max_steps=10, count_tokens=words, max_tokens=10**6,
                        excluded_needles={traces[0].needle, traces[3].needle})
    assert [item["number"] for item in fewer] == [1, 2, 4, 5]


def test_the_exported_file_reads_back_on_the_training_side(tmp_path) -> None:
    from training.data import read_units_items

    out = tmp_path / "items.json"
    assert main(["--out", str(out), "--traces", "4", "--min-steps", "5", "--max-steps", "6"]) == 0
    source, items = read_units_items(out.read_text(encoding="utf-8"))
    raw = json.loads(out.read_text(encoding="utf-8"))["items"]
    assert "research over the NQ training part" in source and len(items) == len(raw) >= 3
    assert [(item.question, list(item.units), item.gold_index) for item in items] == \
        [(r["question"], r["units"], r["gold"]) for r in raw]


def test_the_left_out_traces_are_the_documented_benchmark_runs() -> None:
    """trace_items leaves out the needles of the conversational traces docs/BENCHMARKS.md reports:
    if that run's arguments change, DOCUMENTED_TRACES (and with it the left-out needles) must too."""
    from pathlib import Path

    from bench.conversational import DOCUMENTED_TRACES as spec

    docs = (Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    command = (f"python -m bench.conversational --traces {spec['n_traces']} --min-steps {spec['min_steps']} "
               f"--max-steps {spec['max_steps']} --corpus-rev {spec['corpus_rev']}")
    assert f"Command: `{command}`" in docs
    assert f"(seed {spec['seed']};" in docs
