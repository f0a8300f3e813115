"""What one scoring call costs, and what bounds it (issue 18): time and peak memory per case.

Each case runs in a child process of its own (the model loaded there first). Resident memory is
sampled every 5 ms during the call: ``model`` is what the process held just before it, ``peak``
the most it held during it, ``request`` the difference.

- ``qr 2k`` / ``qr 27k``: the QR heads alone (``CCPROXY_SCORING_MODE=qrhead``) on 15 and 200 NQ
  documents; ms per 1k context tokens (the bar: flat per-token cost from 2 k to 27 k tokens).
- ``both, ratio 0.5``: the default scorer on 200 documents, without and with the policy's
  ``KeepHint`` for a 50 % ratio: the pre-filtered units all fit, so the QR pass is skipped.
- adversarial: a 40 k-character query (a question, then pasted JSON) over 20 documents; one
  50 k-token unit among 19 documents; a 200 k-token context (1,500 NQ passages, the file's
  thousand and half of them again) with the default scorer, and with the encoder reading all of
  it (``CCPROXY_SCORING_ENCODER_MAX_TOKENS=0``, the default before BM25 bounded it).

    .venv/bin/python -m bench.scorer_cost            # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
RESULTS_MD = ROOT / "bench" / "results" / "scorer_cost.md"
MARKS = ("<!-- scorer-cost:start -->", "<!-- scorer-cost:end -->")
CASES = ("qr 2k", "qr 27k", "both, ratio 0.5, no hint", "both, ratio 0.5, hint",
         "40k-character query", "one 50k-token unit", "200k-token context, encoder uncapped", "200k-token context")


def _rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRss:
    """The most resident memory seen while the block runs, sampled from a thread."""

    def __enter__(self) -> PeakRss:
        self.peak = _rss_mib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _documents(n: int) -> tuple[str, list[str]]:
    from bench.multiturn import load_items
    from nqdata.items import load_records

    if n <= 200:
        item = load_items(n, 0)[0]
        return item.question, item.document_texts()
    # Every passage of the file (both parts), repeated until there are n: cost, not quality.
    records = load_records("eval")
    passages = [f"{r.gold.title}\n{r.gold.text}" for r in load_records("train") + records]
    return records[0].question, [passages[k % len(passages)] for k in range(n)]


def run_case(case: str, threads: int) -> dict[str, Any]:
    """In the child: load what the case needs, score once, report."""
    import torch

    from ccproxy.compression.policy import KeepHint
    from ccproxy.compression.scoring import load_scorer
    from ccproxy.settings import Settings

    torch.set_num_threads(threads)
    qr_only = case.startswith("qr") or case in ("40k-character query", "one 50k-token unit")
    settings = Settings(scoring_mode="qrhead" if qr_only else "fusion-prefiltered")
    if case.endswith("encoder uncapped"):  # the scorer before BM25 bounded the encoder's read
        settings = settings.model_copy(update={"scoring_encoder_max_tokens": 0})
    scorer = load_scorer(settings)
    tokenizer = scorer.tokenizer
    if case == "qr 2k":
        query, units = _documents(15)
    elif case == "qr 27k" or case.startswith("both"):
        query, units = _documents(200)
    elif case == "40k-character query":
        query, units = _documents(20)
        query = query + "\n" + '{"key": "value", "n": 12345}, ' * 1400
    elif case == "one 50k-token unit":
        query, units = _documents(19)
        units = units + [" ".join(units) * 20]
    else:
        query, units = _documents(1500)
    tokens = [len(ids) for ids in tokenizer(units, add_special_tokens=False).input_ids]
    hint = KeepHint(tuple(tokens), sum(tokens) // 2) if case.endswith(", hint") else None
    scorer.score(query, units[:2])  # warm-up: first-call allocations are not the case's
    model_mib = _rss_mib()
    with PeakRss() as rss:
        started = time.perf_counter()
        scores = scorer.score(query, units, hint) if hint is not None else scorer.score(query, units)
        seconds = time.perf_counter() - started
    assert len(scores) == len(units)
    return {
        "case": case, "units": len(units), "context_tokens": sum(tokens), "query_chars": len(query),
        "seconds": seconds, "model_mib": model_mib, "peak_mib": rss.peak,
        "skipped": getattr(scorer, "passes_skipped", 0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child's entry
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    options = parser.parse_args(argv)
    if options.case:
        print(json.dumps(run_case(options.case, options.threads)))
        return 0
    command = "python -m bench.scorer_cost " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for case in CASES:
        child = subprocess.run([sys.executable, "-m", "bench.scorer_cost", "--threads", str(options.threads),
                                "--case", case], capture_output=True, text=True, cwd=ROOT, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{case}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    from bench.compressor_bench import cpu_name
    from bench.load import run_line

    lines = [
        MARKS[0], "## Scorer cost and bounds", "",
        run_line(command, f"{cpu_name()}, {options.threads} torch threads", (time.perf_counter() - started) / 60,
                 (load_start[0], os.getloadavg()[0])),
        "",
        "One scoring call per case, each in a process of its own after a warm-up call; tokens are the "
        "scoring model's (SmolLM2). *model*: resident memory before the call (model loaded, warm-up done); "
        "*peak*: the most resident memory sampled (every 5 ms) during it; *request* = peak − model. *QR pass skipped*: the pre-filtered units fit "
        "the policy's allowance (`KeepHint`), so their QR-head scores could not change what is kept.",
        "",
        "| case | units | context tokens | query chars | seconds | ms / 1k tokens | model MiB | peak MiB | request MiB | QR pass skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['units']:,} | {r['context_tokens']:,} | {r['query_chars']:,} | {r['seconds']:.2f} | "
            f"{1e6 * r['seconds'] / max(r['context_tokens'], 1):,.0f} | {r['model_mib']:,.0f} | "
            f"{r['peak_mib']:,.0f} | {r['peak_mib'] - r['model_mib']:,.0f} | {'yes' if r['skipped'] else 'no'} |"
        )
    lines += ["", MARKS[1], ""]
    from bench.load import publish

    publish("\n".join(lines), RESULTS_MD, None if options.no_docs else BENCHMARKS_MD, MARKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
