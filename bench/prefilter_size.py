"""How many tokens the encoder passes to the QR heads (CCPROXY_SCORING_PREFILTER_TOKENS): cost and kept.

The default scorer (``fusion-prefiltered``) rescores the encoder's best units with the QR heads
on any context over the pre-filter size. The QR model reads 6,000-token windows: a pre-filter of
8,000 tokens needs two windows and the joint window over their best, one that fits a single
window (about 5,000 tokens after the instruction and the question) needs one. Items: the
evaluation part, 200 documents each with hard distractors (~27 k tokens). Per item the encoder
scores once; each size then runs the QR pass on its own pre-filtered units (``score_with_dense``),
timed alone. Budgets as in the compressor benchmark (policy ``select``).

    .venv/bin/python -m bench.prefilter_size --n-items 20         # ~12 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.compressor_bench import Setting, TokenCounter, budget_column, build_items, cpu_name, evaluate, gold_kept_cells
from bench.load import publish, run_line

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
RESULTS_MD = ROOT / "bench" / "results" / "prefilter_size.md"
MARKS = ("<!-- prefilter-size:start -->", "<!-- prefilter-size:end -->")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-items", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, 5000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    options = parser.parse_args(argv)
    command = "python -m bench.prefilter_size " + shlex.join(argv if argv is not None else sys.argv[1:])

    import torch

    from ccproxy.compression.fused import FusedScorer
    from ccproxy.compression.scoring import load_scorer
    from ccproxy.settings import Settings

    torch.set_num_threads(options.threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    counter = TokenCounter()
    items = build_items(Setting(200, "hard", options.n_items), options.seed, counter, "eval")
    shipped = load_scorer(Settings())
    arms = {size: FusedScorer(shipped.qr, shipped.dense, "fusion-prefiltered", method=shipped.method,
                              weight=shipped.weight, prefilter_tokens=size) for size in options.sizes}
    rows: dict[int, list[dict[str, Any]]] = {size: [] for size in arms}
    seconds = {size: 0.0 for size in arms}
    encoder_seconds = 0.0
    for n, prepared in enumerate(items):
        query, units = prepared.item.question, prepared.item.document_texts()
        t0 = time.perf_counter()
        dense = shipped.dense.scores_many([(query, units)])[0]
        encoder_seconds += time.perf_counter() - t0
        for size, scorer in arms.items():
            t0 = time.perf_counter()
            scores = scorer.score_with_dense(query, units, dense)
            seconds[size] += time.perf_counter() - t0
            rows[size].append(evaluate(prepared, scores, counter))
        log(f"{n + 1}/{len(items)}: gold rank " + ", ".join(f"{s}: {rows[s][-1]['gold_rank']}" for s in arms))
    budgets = list(rows[options.sizes[0]][0]["budgets"])
    n_items = len(items)
    lines = [
        MARKS[0], "## How much the QR heads rescore: the pre-filter size", "",
        run_line(command, f"{cpu_name()}, {options.threads} torch threads", (time.perf_counter() - started) / 60,
                 (load_start[0], os.getloadavg()[0])),
        "",
        f"{n_items} items of the evaluation part, 200 documents each, hard distractors (mean "
        f"{sum(p.context_tokens for p in items) / n_items:,.0f} document tokens). The default scorer "
        "(`fusion-prefiltered`) with each pre-filter size: the encoder's best units up to that many tokens are "
        "rescored by the QR heads (6,000-token windows) and fused, the rest rank below. *QR pass*: seconds per "
        f"item for that size's pass alone; the encoder's pass, shared, took {encoder_seconds / n_items:.1f} s per item. "
        "Budgets as in the compressor benchmark (policy `select`; @4k: 4,000 tokens for the whole prompt).",
        "",
        "| pre-filter tokens | QR pass s / item | gold first | gold in top 4 | "
        + " | ".join(budget_column(b) for b in budgets) + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(budgets),
    ]
    for size in arms:
        mine = rows[size]
        cells = [f"{size:,}", f"{seconds[size] / n_items:.1f}", f"{sum(r['gold_rank'] == 1 for r in mine) / n_items:.3f}",
                 f"{sum(r['gold_rank'] <= 4 for r in mine) / n_items:.3f}"]
        cells += gold_kept_cells(mine, budgets)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", MARKS[1], ""]
    publish("\n".join(lines), RESULTS_MD, None if options.no_docs else BENCHMARKS_MD, MARKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
