"""Aggressive budgets: does the answer survive a 20× cut when the best unit is kept in part?

Evaluation part of the NQ file (``bench/nq.py``): one gold passage among hard distractors (mined
by BM25 and MiniLM, none holding an answer), the question last, as one chat message. The
product's compression runs in-process (``ContextCompressor`` with ``load_scorer``, server
defaults) in two arms that differ only in ``CCPROXY_COMPRESSION_PARTIAL_UNITS``:

- ``whole units``: the best unit that does not fit is skipped (the policy before issue 21);
- ``partial``: its best sentences are kept, gaps marked ``…``, the marker counted.

Both arms read the same scores (one scorer pass per item, memoised; the partial arm's extra
pass over one unit's sentences is its own). Reported per budget: the answer string kept (any
gold answer in what is forwarded before the question, SQuAD-normalised), the gold passage kept
whole, and the share of the droppable tokens actually kept.

    .venv/bin/python -m bench.aggressive                       # make aggressive
    .venv/bin/python -m bench.aggressive --n-items 20 --no-docs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from bench.compressor_bench import cpu_name
from bench.load import write_section
from bench.multiturn import load_items
from bench.nq import Item, contains_answer
from ccproxy.compression.gateway import ContextCompressor
from ccproxy.compression.local import _compressor
from ccproxy.protocol import CompressionControl
from ccproxy.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "bench" / "results" / "aggressive.md"
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
MARKS = ("<!-- aggressive:start -->", "<!-- aggressive:end -->")
ARMS = {"whole units": False, "partial": True}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class MemoScorer:
    """The scorer, each (query, units) scored once for both arms."""

    def __init__(self, score) -> None:  # type: ignore[no-untyped-def]
        self._score = score
        self._seen: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        self.seconds = 0.0

    async def __call__(self, query: str, units: Sequence[str]) -> list[float]:
        key = (query, tuple(units))
        if key not in self._seen:
            started = time.perf_counter()
            self._seen[key] = await self._score(query, units)
            self.seconds += time.perf_counter() - started
        return self._seen[key]


async def one(compressor: ContextCompressor, counter, item: Item, ratio: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    messages = item.messages()
    plan = compressor.plan(CompressionControl(enabled=True, ratio=ratio))
    result = await compressor.compress(messages, plan, counter)
    sent = result.forwarded[-1]["content"]
    context = sent[: sent.rfind("Question:")]
    droppable = sum(u.tokens for u in result.units if not u.protected) or 1
    kept = sum(u.tokens for u in result.units if u.kept and not u.protected)
    gold = item.document_texts()[item.gold_index]
    return {
        "answer": float(contains_answer(context, item.record.answers)),
        "gold_whole": float(gold in context),
        "kept_share": kept / droppable,
    }


async def run(items: Sequence[Item], ratios: Sequence[float], settings: Settings) -> dict[tuple[str, float], list[dict[str, float]]]:
    base, counter = _compressor(settings)
    memo = MemoScorer(base._score)
    arms = {
        name: ContextCompressor(memo, settings.model_copy(update={"compression_partial_units": partial}))
        for name, partial in ARMS.items()
    }
    results: dict[tuple[str, float], list[dict[str, float]]] = {(a, r): [] for a in ARMS for r in ratios}
    started = time.perf_counter()
    for n, item in enumerate(items):
        for ratio in ratios:
            for name, compressor in arms.items():
                results[(name, ratio)].append(await one(compressor, counter, item, ratio))
        if (n + 1) % 10 == 0 or n + 1 == len(items):
            log(f"{n + 1}/{len(items)} items, {time.perf_counter() - started:.0f} s (scoring {memo.seconds:.0f} s)")
    return results


def _mean(rows: Sequence[dict[str, float]], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows) if rows else 0.0


def report(results, ratios: Sequence[float], n_items: int, documents: int, command: str, seconds: float,
           load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:  # type: ignore[no-untyped-def]
    lines = [
        MARKS[0],
        "## Aggressive budgets: the best unit kept in part",
        "",
        f"Command: `{command}` (`make aggressive`). Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on "
        f"{cpu_name()}, {os.cpu_count()} cores, {seconds / 60:.1f} min; 1-min load average "
        f"{load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end"
        + (" (the machine was busy: other work shared the cores)" if max(load[0][0], load[1][0]) > 1.5 else "")
        + ".",
        "",
        f"{n_items} items of the evaluation part, {documents} documents each (hard distractors), the question "
        "last; the default scorer, server defaults but for the ratio. Both arms from the same run and the "
        "same scores. *answer kept*: a gold answer string in what is forwarded before the question; "
        "*gold whole*: the gold passage forwarded whole; *kept share*: droppable tokens kept ÷ droppable "
        "tokens (the ratio achieved; it may be below the ratio asked).",
        "",
        "| ratio | arm | answer kept | gold whole | kept share |",
        "| --- | --- | --- | --- | --- |",
    ]
    for ratio in ratios:
        for arm in ARMS:
            rows = results[(arm, ratio)]
            lines.append(
                f"| {ratio:.0%} | {arm} | {_mean(rows, 'answer'):.3f} | {_mean(rows, 'gold_whole'):.3f} | "
                f"{_mean(rows, 'kept_share'):.3f} |"
            )
    lines += ["", MARKS[1], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-items", type=int, default=200)
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    options = parser.parse_args(argv)
    command = "python -m bench.aggressive " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    log(f"1-min load average at the start: {load_start[0]:.1f}")
    started = time.perf_counter()
    settings = Settings(compression_threshold_tokens=0, compressor_timeout_s=3600)
    items = load_items(options.documents, options.seed)[: options.n_items]
    results = asyncio.run(run(items, options.ratios, settings))
    section = report(results, options.ratios, len(items), options.documents, command.strip(),
                     time.perf_counter() - started, (load_start, os.getloadavg()))
    print(section)
    RESULTS_MD.write_text(section, encoding="utf-8")
    if not options.no_docs:
        write_section(section, BENCHMARKS_MD, MARKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
