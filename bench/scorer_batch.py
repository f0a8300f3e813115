"""Batched scoring vs one request at a time (issue 18), same requests, same process, same run.

N requests of about 1 k context tokens each (7 NQ documents and a question, random distractors,
a different question per request), three arms: *one at a time*: ``score_batch`` called with one
request after another, what the Compressor did before (its ``score_batch`` looped over the
batch); *shipped on CPU*: one ``score_batch`` call with all N, the encoder's pieces of all of them
in shared batches, each QR-head window alone (``max_batch_tokens`` 0, the CPU default);
*padded batches*: the same with the windows in padded forwards of up to 16,384 tokens (the CUDA
path; CUDA's default is 32,768). All arms give the same scores
(``tests/scorer/test_qrhead_batch.py``); each arm's best of ``--repeats`` runs, arms alternating.

    .venv/bin/python -m bench.scorer_batch            # ~5 min on 2 cores
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
    from nqdata.items import load_records, random_distractor_items

    items = random_distractor_items(load_records("eval"), 7, n_items=n, seed=3)
    return [(item.question, item.document_texts()) for item in items]


def _timed(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


ARMS = ("one at a time", "shipped on CPU", "padded batches")


def measure(scorer: Any, requests: list[tuple[str, list[str]]], repeats: int) -> list[float]:
    """Best seconds of each arm over ``repeats`` alternating runs."""
    qr = getattr(scorer, "qr", scorer)
    best = [float("inf")] * len(ARMS)
    for _ in range(repeats):
        qr.max_batch_tokens = 0
        best[0] = min(best[0], _timed(lambda: [scorer.score_batch([request]) for request in requests]))
        best[1] = min(best[1], _timed(lambda: scorer.score_batch(requests)))
        qr.max_batch_tokens = 16_384
        best[2] = min(best[2], _timed(lambda: scorer.score_batch(requests)))
    qr.max_batch_tokens = 0
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=2)
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
    for mode in ("qrhead", "fusion-prefiltered", "dense"):
        scorer = load_scorer(Settings(scoring_mode=mode))
        tokenizer = scorer.tokenizer
        for size in options.sizes:
            requests = _requests(size)
            tokens = sum(len(ids) for _, units in requests for ids in tokenizer(units, add_special_tokens=False).input_ids)
            scorer.score_batch(requests[:2])  # warm-up
            seconds = measure(scorer, requests, options.repeats)
            rows.append((mode, size, tokens / size, seconds))
            print(f"{mode} x{size}: " + ", ".join(f"{arm} {t:.2f} s" for arm, t in zip(ARMS, seconds)),
                  file=sys.stderr, flush=True)

    names = {"qrhead": "QR heads alone (`qrhead`)", "fusion-prefiltered": "default (`fusion-prefiltered`)",
             "dense": "encoder alone (`dense`)"}
    lines = [
        MARKS[0], "## Batched scoring", "",
        run_line(command, f"{cpu_name()}, {options.threads} torch threads", (time.perf_counter() - started) / 60,
                 (load_start[0], os.getloadavg()[0])),
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "| scorer | requests | context tokens each | " + " | ".join(f"{arm} s (req/s)" for arm in ARMS)
        + " | padded / one at a time |",
        "|---|---:|---:|" + "---:|" * len(ARMS) + "---:|",
    ]
    for mode, size, tokens, seconds in rows:
        cells = " | ".join(f"{t:.2f} ({size / t:.2f})" for t in seconds)
        lines.append(f"| {names[mode]} | {size} | {tokens:,.0f} | {cells} | {seconds[2] / seconds[0]:.2f} |")
    lines += ["", MARKS[1], ""]
    publish("\n".join(lines), RESULTS_MD, None if options.no_docs else BENCHMARKS_MD, MARKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
