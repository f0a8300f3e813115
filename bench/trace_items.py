"""Head-detection items from agent traces: the conversational half of head detection (issue 18).

The agent traces of ``bench/agent_traces.py`` read as retrieval items, as ``bench/conversational.py``
reads them: the units are a trace's tool results (code windows, grep hits as lines or JSON, pytest
log pieces; search listings and NQ pages), the query is the final question, and the gold is the one
tool result holding what it needs. For detection they come from data no benchmark reads:

* research traces over the TRAINING part of the NQ file (lines 0-499; the benchmarks read 500-999);
* coding traces from their own seed, and any trace whose needle is also a needle of the
  conversational benchmark's documented traces (``BENCH_TRACES``) is left out: both cut their
  traces from this repository's files, so the same line could otherwise be asked for in both.

Detection scores a whole item in one window, so a trace longer than ``--max-tokens`` (SmolLM2
tokens) loses its oldest tool results, never the needed one, until it fits.

The items go to a JSON file that ``training/fit_head_weights.py --trace-items`` reads (``training``
never imports ``bench``; the trace builder lives here):

    .venv/bin/python -m bench.trace_items --out /tmp/qrh/trace_items.json    # ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from bench.agent_traces import RepoFile, Trace, build_traces, corpus_rev_help, repo_corpus, tree_state
from bench.conversational import DOCUMENTED_TRACES as BENCH_TRACES


def fit_window(unit_tokens: Sequence[int], gold: int, max_tokens: int) -> int:
    """How many of the oldest units to drop so the rest hold at most ``max_tokens`` tokens, never
    dropping ``gold``; -1 when even the gold and everything after it do not fit."""
    total = sum(unit_tokens)
    dropped = 0
    while total > max_tokens:
        if dropped >= gold:
            return -1
        total -= unit_tokens[dropped]
        dropped += 1
    return dropped


def trace_item(trace: Trace, count_tokens: Callable[[str], int], max_tokens: int) -> dict[str, Any] | None:
    """The trace as an item (the JSON the training side reads), or None when it cannot fit."""
    units = [step.output for step in trace.steps]
    dropped = fit_window([count_tokens(unit) for unit in units], trace.needle_step, max_tokens)
    if dropped < 0:
        return None
    return {"number": trace.number, "kind": trace.kind, "question": trace.question,
            "units": units[dropped:], "gold": trace.needle_step - dropped}


def trace_items(
    n_traces: int,
    *,
    seed: int,
    min_steps: int,
    max_steps: int,
    count_tokens: Callable[[str], int],
    max_tokens: int,
    excluded_needles: Collection[str] = (),
    corpus: Sequence[RepoFile] | None = None,
) -> list[dict[str, Any]]:
    """Up to ``n_traces`` items (coding and research alternately), research over the NQ training
    part; traces whose needle is in ``excluded_needles`` or whose needed result alone overflows
    ``max_tokens`` are left out, so fewer may come back."""
    traces = build_traces(n_traces, min_steps, max_steps, seed, corpus=corpus, nq_part="train")
    items = []
    for trace in traces:
        if trace.needle in excluded_needles:
            continue
        item = trace_item(trace, count_tokens, max_tokens)
        if item is not None:
            items.append(item)
    return items


def bench_needles() -> set[str]:
    """The needles of the conversational benchmark's documented traces."""
    spec = BENCH_TRACES
    traces = build_traces(spec["n_traces"], spec["min_steps"], spec["max_steps"], spec["seed"],
                          corpus=repo_corpus(revision=spec["corpus_rev"]))
    return {trace.needle for trace in traces}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--traces", type=int, default=160)
    parser.add_argument("--min-steps", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1018)
    parser.add_argument("--max-tokens", type=int, default=5000, help="tool-result tokens kept per item (one window)")
    # By default the files the benchmark's traces were cut from: the exclusion of its needles then
    # compares like with like, and the items do not change with every commit.
    parser.add_argument("--corpus-rev", metavar="REV", default=BENCH_TRACES["corpus_rev"],
                        help=corpus_rev_help(f"{BENCH_TRACES['corpus_rev']}, as the benchmark's"))
    options = parser.parse_args(argv)

    from ccproxy.compression.model import load_scoring_tokenizer

    tokenizer = load_scoring_tokenizer()
    items = trace_items(options.traces, seed=options.seed, min_steps=options.min_steps, max_steps=options.max_steps,
                        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False).input_ids),
                        max_tokens=options.max_tokens, excluded_needles=bench_needles(),
                        corpus=repo_corpus(revision=options.corpus_rev))
    coding = sum(item["kind"] == "coding" for item in items)
    source = (f"{len(items)} agent traces of bench/trace_items.py ({coding} coding, cut from "
              f"{tree_state(options.corpus_rev)}; "
              f"{len(items) - coding} research over the NQ training part): seed {options.seed}, "
              f"{options.min_steps}-{options.max_steps} tool steps, the newest results up to {options.max_tokens} "
              "tokens, needles of the conversational benchmark's traces left out")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps({"source": source, "items": items}), encoding="utf-8")
    print(f"wrote {options.out}: {source}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
