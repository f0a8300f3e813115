"""Batched scoring vs one request at a time (issue 18), same requests, same process, same run.

N requests of about 1 k context tokens each (7 NQ documents and a question, random distractors,
a different question per request). *one at a time*: ``score_batch`` called with one request after
another, what the Compressor did before batching (its ``score_batch`` looped over the batch);
*batched*: one ``score_batch`` call with all N, whose windows go through the model in padded
forwards. Both produce the same scores (``tests/scorer/test_qrhead_batch.py``); the table gives
each arm's best of ``--repeats`` runs, alternating arms.

    .venv/bin/python -m bench.scorer_batch            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
RESULTS_MD = ROOT / "bench" / "results" / "scorer_batch.md"
MARKS = ("<!-- scorer-batch:start -->", "<!-- scorer-batch:end -->")


def _requests(n: int) -> list[tuple[str, list[str]]]:
    from bench.nq import load_records, random_distractor_items

    items = random_distractor_items(load_records("eval"), 7, n_items=n, seed=3)
    return [(item.question, item.document_texts()) for item in items]


def _timed(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(scorer: Any, requests: list[tuple[str, list[str]]], repeats: int) -> tuple[float, float]:
    """Best seconds of (one at a time, batched) over ``repeats`` alternating runs."""
    singles, batched = [], []
    for _ in range(repeats):
        singles.append(_timed(lambda: [scorer.score_batch([request]) for request in requests]))
        batched.append(_timed(lambda: scorer.score_batch(requests)))
    return min(singles), min(batched)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    options = parser.parse_args(argv)
    command = "python -m bench.scorer_batch " + shlex.join(argv if argv is not None else sys.argv[1:])

    import torch

    from bench.compressor_bench import cpu_name
    from bench.load import publish, run_line
    from ccproxy.compression.scoring import load_scorer
    from ccproxy.settings import Settings

    torch.set_num_threads(options.threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for mode in ("off", "both"):
        scorer = load_scorer(Settings(scoring_dense=mode))
        tokenizer = scorer.tokenizer
        for size in options.sizes:
            requests = _requests(size)
            tokens = sum(len(ids) for _, units in requests for ids in tokenizer(units, add_special_tokens=False).input_ids)
            scorer.score_batch(requests[:2])  # warm-up
            single, batched = measure(scorer, requests, options.repeats)
            rows.append((mode, size, tokens / size, single, batched))
            print(f"{mode} x{size}: {single:.2f} s one at a time, {batched:.2f} s batched", file=sys.stderr, flush=True)

    names = {"off": "QR heads alone (`off`)", "both": "default (`both`)"}
    lines = [
        MARKS[0], "## Batched scoring", "",
        run_line(command, f"{cpu_name()}, {options.threads} torch threads", (time.perf_counter() - started) / 60,
                 (load_start[0], os.getloadavg()[0])),
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "| scorer | requests | context tokens each | one at a time s | batched s | requests/s one at a time | requests/s batched | batched / one at a time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, size, tokens, single, batched in rows:
        lines.append(
            f"| {names[mode]} | {size} | {tokens:,.0f} | {single:.2f} | {batched:.2f} | {size / single:.2f} | "
            f"{size / batched:.2f} | {batched / single:.2f} |"
        )
    lines += ["", MARKS[1], ""]
    publish("\n".join(lines), RESULTS_MD, None if options.no_docs else BENCHMARKS_MD, MARKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
