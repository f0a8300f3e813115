"""Conversational retrieval: does the scorer find the one earlier tool result a late question
needs? (issue 18: "strictly above MiniLM on a conversational benchmark")

The agent traces of ``bench/agent_traces.py``: coding loops over this repository (windows of real
files, grep hits as lines or JSON, pieces of a real pytest log) and research loops over NQ pages,
each ending with a question whose answer lies in ONE tool result, often far back. Here the units
are the tool results, the query is that question, and each scorer ranks the units; the product's
policy (``ccproxy.compression.policy.select``, whole units) then keeps the best that fit 10 and
20 % of the tool-output tokens (SmolLM2 tokens, as the Compressor counts). A sentence encoder
reads code, logs and JSON less well than prose: this is where it should be weak.

Scorers, all as the product builds them: ``default`` (``CCPROXY_SCORING_MODE`` at its default,
``fusion-prefiltered``), ``qrhead`` (the QR heads alone), ``dense`` (MiniLM alone, as
``CCPROXY_SCORING_MODE=dense`` runs it); baselines ``bm25`` and ``recent`` (newest first).

    .venv/bin/python -m bench.conversational                 # writes bench/results/conversational.md
    .venv/bin/python -m bench.conversational --traces 4 --max-steps 16 --out /tmp/c.md   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.agent_traces import CORPUS_REV_HELP, Trace, build_traces, repo_corpus, tree_state

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.10, 0.20)
SCORERS = ("default", "qrhead", "dense", "bm25", "recent")
Scorer = Callable[[str, Sequence[str]], list[float]]
# The traces of the documented run (docs/BENCHMARKS.md, *Conversational retrieval*), which
# bench/trace_items.py keeps out of its training items; a test checks the docs still say so.
DOCUMENTED_TRACES: dict[str, Any] = {"n_traces": 20, "min_steps": 10, "max_steps": 30, "seed": 18, "corpus_rev": "888722f"}


@dataclass(frozen=True)
class Case:
    trace: Trace
    units: list[str]  # the tool results, oldest first
    gold: int  # the one unit holding the needle
    unit_tokens: list[int]

    @property
    def steps_back(self) -> int:
        return len(self.units) - 1 - self.gold


def cases(traces: Sequence[Trace], tokenizer: Any) -> list[Case]:
    out = []
    for trace in traces:
        gold = trace.needle_step
        assert trace.tool_results_holding_needle() == [gold], trace.number  # one unit holds the needle
        units = [step.output for step in trace.steps]
        tokens = [len(ids) for ids in tokenizer(units, add_special_tokens=False).input_ids]
        out.append(Case(trace, units, gold, tokens))
    return out


def product_scorers(names: Sequence[str], head_sets: Sequence[str] = (),
                    adapters: Sequence[str] = ()) -> dict[str, tuple[Scorer, Any]]:
    """name -> (score function, tokenizer); the QR model is loaded once and shared. Each of
    ``head_sets`` adds ``qrhead:<set>`` (and ``default:<set>`` when ``default`` is asked for):
    the same scorer with ``CCPROXY_SCORING_HEAD_SET=<set>``, so head sets compare in one run. Each
    of ``adapters`` (a LoRA folder or a shipped adapter's name) adds ``qrhead+<name>`` (and
    ``default+<name>``): the scorer with ``CCPROXY_SCORING_LORA_PATH=<adapter>``, on the head set
    the adapter was trained for."""
    from ccproxy.compression.scoring import encoder_scorer, fused_scorer, load_scorer
    from ccproxy.settings import Settings

    built: dict[str, tuple[Scorer, Any]] = {}
    qr = None
    if {"default", "qrhead"} & set(names):
        qr = load_scorer(Settings(scoring_mode="qrhead"))
    if "qrhead" in names:
        built["qrhead"] = (qr.score, qr.tokenizer)
    if "default" in names:
        default = fused_scorer(qr, Settings())  # the default mode, on the same QR model
        built["default"] = (default.score, default.tokenizer)
    variants = [(f":{head_set}", {"scoring_head_set": head_set}) for head_set in head_sets]
    variants += [(f"+{Path(adapter).name}", {"scoring_lora_path": adapter}) for adapter in adapters]
    for suffix, setting in variants:
        other = load_scorer(Settings(scoring_mode="qrhead", **setting))
        built[f"qrhead{suffix}"] = (other.score, other.tokenizer)
        if "default" in names:
            fused = fused_scorer(other, Settings(**setting))
            built[f"default{suffix}"] = (fused.score, fused.tokenizer)
    if "dense" in names:
        dense = encoder_scorer(Settings(scoring_mode="dense"), None)
        built["dense"] = (dense.score, dense.tokenizer)
    if "bm25" in names:
        from nqdata.retrievers import bm25_scores

        built["bm25"] = (lambda query, units: [float(s) for s in bm25_scores(query, units)], None)
    if "recent" in names:
        built["recent"] = (lambda query, units: [float(i) for i in range(len(units))], None)
    return built


def evaluate(case: Case, scores: Sequence[float]) -> dict[str, Any]:
    from ccproxy.compression.policy import select

    order = sorted(range(len(scores)), key=lambda i: (scores[i], i), reverse=True)
    rank = order.index(case.gold) + 1
    total = sum(case.unit_tokens)
    kept = {}
    for budget in BUDGETS:
        keep = select(case.unit_tokens, scores, [False] * len(scores), int(total * budget))
        kept[f"{budget:.0%}"] = keep[case.gold]
    return {"rank": rank, "kept": kept}


def summary_rows(results: dict[str, list[dict[str, Any]]], picked: Sequence[Case]) -> list[str]:
    rows = []
    for name, per_case in results.items():
        for kind in ("all", "coding", "research"):
            mine = [r for r, case in zip(per_case, picked, strict=True) if kind in ("all", case.trace.kind)]
            if not mine:
                continue
            kept = [f"{statistics.fmean(r['kept'][f'{b:.0%}'] for r in mine):.3f}" for b in BUDGETS]
            top1 = statistics.fmean(r["rank"] == 1 for r in mine)
            top3 = statistics.fmean(r["rank"] <= 3 for r in mine)
            mrr = statistics.fmean(1 / r["rank"] for r in mine)
            seconds = statistics.fmean(r["seconds"] for r in mine)
            rows.append(f"| `{name}` | {kind} | {len(mine)} | {' | '.join(kept)} | {top1:.3f} | {top3:.3f} | {mrr:.3f} | {seconds:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=int, default=24)
    parser.add_argument("--min-steps", type=int, default=12)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--scorers", nargs="+", choices=SCORERS, default=list(SCORERS))
    parser.add_argument("--head-sets", nargs="*", default=[], metavar="SET",
                        help="also score with these shipped head sets (qrhead:<set>, default:<set>)")
    parser.add_argument("--adapters", nargs="*", default=[], metavar="ADAPTER",
                        help="also score with these LoRA adapters (qrhead+<name>, and default+<name>)")
    parser.add_argument("--corpus-rev", metavar="REV", help=CORPUS_REV_HELP)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "conversational.md")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "conversational_items.json")
    options = parser.parse_args(argv)
    command = "python -m bench.conversational " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    started = time.perf_counter()

    scorers = product_scorers(options.scorers, options.head_sets, options.adapters)
    from ccproxy.compression.model import load_scoring_tokenizer

    tokenizer = load_scoring_tokenizer()
    traces = build_traces(options.traces, options.min_steps, options.max_steps, options.seed,
                          corpus=repo_corpus(revision=options.corpus_rev))
    picked = cases(traces, tokenizer)
    results: dict[str, list[dict[str, Any]]] = {}
    for name, (score, _) in scorers.items():
        results[name] = []
        for case in picked:
            began = time.perf_counter()
            scores = score(case.trace.question, case.units)
            result = evaluate(case, scores)
            result["seconds"] = time.perf_counter() - began
            results[name].append(result)
        print(f"{name}: done, {time.perf_counter() - started:.0f} s in all", file=sys.stderr, flush=True)

    load_end = os.getloadavg()
    busy = max(load_start[0], load_end[0]) > 1.5
    tokens = [sum(case.unit_tokens) for case in picked]
    steps_back = [case.steps_back for case in picked]
    lines = [
        "## Conversational retrieval: the one tool result a late question needs",
        "",
        f"Command: `{command}`. Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{(time.perf_counter() - started) / 60:.1f} min; 1-min load average {load_start[0]:.1f} at the start, "
        f"{load_end[0]:.1f} at the end" + (" (the machine was busy: seconds inflated)." if busy else "."),
        "",
        f"{len(picked)} agent traces of `bench/agent_traces.py` (seed {options.seed}; "
        f"{sum(c.trace.kind == 'coding' for c in picked)} coding, cut from {tree_state(options.corpus_rev)}; "
        f"{sum(c.trace.kind == 'research' for c in picked)} research), "
        f"{options.min_steps}–{options.max_steps} tool steps each; units = the tool results "
        f"({min(tokens):,}–{max(tokens):,} tokens in all, median {statistics.median(tokens):,.0f}); "
        f"query = the final question; the needed result lies {min(steps_back)}–{max(steps_back)} "
        f"steps before the end (median {statistics.median(steps_back):.0f}). Kept: the product's policy keeps the "
        "best whole units within the budget (a share of the tool-output tokens); rank: the needed unit's place "
        "in the scorer's order. Seconds: scoring one trace.",
        "",
        "| scorer | traces | n | kept 10% | kept 20% | top 1 | top 3 | MRR | s / trace |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *summary_rows(results, picked),
        "",
    ]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text("\n".join(lines), encoding="utf-8")
    items = [
        {"trace": case.trace.number, "kind": case.trace.kind, "needle_kind": case.trace.needle_kind,
         "units": len(case.units), "gold": case.gold, "tokens": sum(case.unit_tokens),
         **{name: results[name][i] for name in results}}
        for i, case in enumerate(picked)
    ]
    options.json.write_text(json.dumps(items, indent=1), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
