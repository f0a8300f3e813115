"""The QR heads alone over contexts longer than one window: windowed means vs the joint window.

Issue 18: each window has its own softmax, so windowed scores are not comparable (every window
has a winner). ``QRHeadScorer.scored`` returns both rankings from one pass: ``windowed`` (the
mean of each unit's scores over its windows, the scorer before the joint window) and ``ranked``
(each window's best re-scored together in one final window, what the scorer serves now). Both
go through ``bench.compressor_bench.evaluate``: the product's policy at 10/20/30 % of the
document tokens and at 4,000 tokens for the whole prompt, and the gold passage's rank.

    .venv/bin/python -m bench.joint_window --n-items 20       # 200 documents, hard distractors
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.compressor_bench import (
    RATIOS,
    TokenCounter,
    _qr_scorer,
    budget_column,
    cpu_name,
    evaluate,
    gold_kept_cells,
    prepare,
    scorer_env,
)
from bench.load import publish, run_line
from bench.multiturn import load_items
from ccproxy.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
RESULTS_MD = ROOT / "bench" / "results" / "joint_window.md"
MARKS = ("<!-- joint-window:start -->", "<!-- joint-window:end -->")
ARMS = ("windowed", "ranked")
LABELS = {"windowed": "windowed means (before)", "ranked": "joint window (now)"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def table(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    labels = [f"{round(r * 100)}%" for r in RATIOS] + ["4000"]
    lines = [
        "| scores | gold first | gold in top 4 | " + " | ".join(budget_column(b) for b in labels) + " |",
        "|---|---:|---:|" + "---:|" * len(labels),
    ]
    for arm in ARMS:
        mine = rows[arm]
        cells = [LABELS[arm], f"{_mean([r['gold_rank'] == 1 for r in mine]):.3f}",
                 f"{_mean([r['gold_rank'] <= 4 for r in mine]):.3f}"]
        cells += gold_kept_cells(mine, labels)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-items", type=int, default=20)
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    parser.add_argument("--out", type=Path, default=RESULTS_MD, help="where the section is kept")
    options = parser.parse_args(argv)
    settings = Settings()
    command = scorer_env(settings) + "python -m bench.joint_window " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    started = time.perf_counter()
    scorer = _qr_scorer(heads_from_file=True)
    head_set = f"The head set `{settings.scoring_head_set}`" if settings.scoring_head_set else "The shipped head set"
    counter = TokenCounter()
    rows: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    seconds, tokens, windows = 0.0, 0, 0
    for n, item in enumerate(load_items(options.documents, options.seed)[: options.n_items]):
        prepared = prepare(item, counter)
        t0 = time.perf_counter()
        scored = scorer.scored(item.question, item.document_texts())
        seconds += time.perf_counter() - t0
        tokens += prepared.context_tokens
        windows += scored.windows
        for arm in ARMS:
            rows[arm].append(evaluate(prepared, getattr(scored, arm), counter))
        log(f"{n + 1}/{options.n_items}: {scored.windows} windows, gold rank "
            f"{rows['windowed'][-1]['gold_rank']} -> {rows['ranked'][-1]['gold_rank']}")
    n_items = len(rows["ranked"])
    lines = [
        MARKS[0],
        "## QR heads alone over many windows: the joint window",
        "",
        run_line(command, f"{cpu_name()}, {os.cpu_count()} cores", (time.perf_counter() - started) / 60,
                 (load_start[0], os.getloadavg()[0])),
        "",
        f"{n_items} items of the evaluation part, {options.documents} documents each (hard distractors; "
        f"mean {tokens / max(n_items, 1):,.0f} document tokens, {windows / max(n_items, 1):.1f} windows of "
        f"{scorer.window_tokens:,} tokens, {scorer.overlap_tokens} shared). {head_set}, no encoder "
        "(`CCPROXY_SCORING_MODE=qrhead`). Both rows come from the "
        "same pass (`QRHeadScorer.scored`): *windowed means* rank by each unit's mean score over its windows "
        "(the scorer before issue 18); *joint window* re-scores each window's best units together in one more "
        "window and ranks them above the rest. Budgets as in the compressor benchmark (policy `select`; @4k: "
        f"4,000 tokens for the whole prompt). Scoring time: {1e6 * seconds / max(tokens, 1):,.1f} ms per 1k "
        "context tokens, joint window included.",
        "",
        *table(rows),
        "",
        MARKS[1],
        "",
    ]
    publish("\n".join(lines), options.out, None if options.no_docs else BENCHMARKS_MD, MARKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
