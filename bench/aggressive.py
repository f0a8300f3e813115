"""Aggressive budgets: does the answer survive a 20× cut when the best unit is kept in part?

Evaluation part of the NQ file (``nqdata/items.py``): one gold passage among hard distractors (mined
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
    .venv/bin/python -m bench.aggressive --documents 200 --ratios --budget-tokens 500 --n-items 40
    .venv/bin/python -m bench.aggressive --n-items 20 --no-docs

Each document count has its own section in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.compressor_bench import cpu_name
from bench.load import publish, run_line
from bench.multiturn import load_items
from ccproxy.compression.gateway import ContextCompressor
from ccproxy.compression.local import _compressor
from ccproxy.compression.policy import KeepHint
from ccproxy.protocol import CompressionControl
from ccproxy.settings import Settings
from nqdata.items import Item, contains_answer

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
ARMS = {"whole units": False, "partial": True}


@dataclass(frozen=True)
class Cut:
    """How much is kept: a ratio of the droppable tokens, or a budget of the whole prompt."""

    ratio: float | None = None
    budget_tokens: int | None = None

    @property
    def label(self) -> str:
        return f"{self.ratio:.0%}" if self.ratio is not None else f"{self.budget_tokens:,} tokens"

    def control(self) -> CompressionControl:
        return CompressionControl(enabled=True, ratio=self.ratio, budget_tokens=self.budget_tokens)


def section_name(documents: int) -> str:
    return "aggressive" if documents == 20 else f"aggressive-{documents}docs"


def marks(documents: int) -> tuple[str, str]:
    return f"<!-- {section_name(documents)}:start -->", f"<!-- {section_name(documents)}:end -->"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class MemoScorer:
    """The scorer, each (query, units, hint) scored once for both arms."""

    def __init__(self, score) -> None:  # type: ignore[no-untyped-def]
        self._score = score
        self._seen: dict[tuple[str, tuple[str, ...], KeepHint | None], list[float]] = {}
        self.seconds = 0.0

    async def __call__(self, query: str, units: Sequence[str], hint: KeepHint | None = None) -> list[float]:
        key = (query, tuple(units), hint)
        if key not in self._seen:
            started = time.perf_counter()
            self._seen[key] = await self._score(query, units, hint)
            self.seconds += time.perf_counter() - started
        return self._seen[key]


async def one(compressor: ContextCompressor, counter, item: Item, cut: Cut) -> dict[str, float]:  # type: ignore[no-untyped-def]
    messages = item.messages()
    result = await compressor.compress(messages, compressor.plan(cut.control()), counter)
    sent = result.forwarded[-1]["content"]
    context = sent[: sent.rfind("Question:")]
    droppable = sum(u.tokens for u in result.units if not u.protected) or 1
    kept = sum(u.kept_tokens for u in result.units if not u.protected)
    gold = item.document_texts()[item.gold_index]
    return {
        "answer": float(contains_answer(context, item.record.answers)),
        "gold_whole": float(gold in context),
        "kept_share": kept / droppable,
        "prompt_tokens": float(result.tokens_after),
    }


async def run(items: Sequence[Item], cuts: Sequence[Cut], settings: Settings) -> dict[tuple[str, Cut], list[dict[str, float]]]:
    base, counter = _compressor(settings)
    memo = MemoScorer(base._score)
    arms = {
        name: ContextCompressor(memo, settings.model_copy(update={"compression_partial_units": partial}))
        for name, partial in ARMS.items()
    }
    results: dict[tuple[str, Cut], list[dict[str, float]]] = {(a, c): [] for a in ARMS for c in cuts}
    started = time.perf_counter()
    for n, item in enumerate(items):
        for cut in cuts:
            for name, compressor in arms.items():
                results[(name, cut)].append(await one(compressor, counter, item, cut))
        if (n + 1) % 10 == 0 or n + 1 == len(items):
            log(f"{n + 1}/{len(items)} items, {time.perf_counter() - started:.0f} s (scoring {memo.seconds:.0f} s)")
    return results


def _mean(rows: Sequence[dict[str, float]], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows) if rows else 0.0


def report(results, cuts: Sequence[Cut], n_items: int, documents: int, command: str, seconds: float,
           load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:  # type: ignore[no-untyped-def]
    lines = [
        marks(documents)[0],
        "## Aggressive budgets: the best unit kept in part"
        + ("" if documents == 20 else f" ({documents} documents)"),
        "",
        run_line(command, f"{cpu_name()}, {os.cpu_count()} cores", seconds / 60, (load[0][0], load[1][0]),
                 make_target="aggressive"),
        "",
        f"{n_items} items of the evaluation part, {documents} documents each (hard distractors), the question "
        "last; the default scorer, server defaults but for the ratio or budget. Both arms from the same run and the "
        "same scores. *answer kept*: a gold answer string in what is forwarded before the question; "
        "*gold whole*: the gold passage forwarded whole; *kept share*: droppable tokens kept ÷ droppable "
        "tokens (the ratio achieved; it may be below the ratio asked); *prompt*: mean tokens of the units "
        "forwarded, the question's included (a budget caps these and the chat framing together).",
        "",
        "| cut | arm | answer kept | gold whole | kept share | prompt |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cut in cuts:
        for arm in ARMS:
            rows = results[(arm, cut)]
            lines.append(
                f"| {cut.label} | {arm} | {_mean(rows, 'answer'):.3f} | {_mean(rows, 'gold_whole'):.3f} | "
                f"{_mean(rows, 'kept_share'):.3f} | {_mean(rows, 'prompt_tokens'):,.0f} |"
            )
    lines += ["", marks(documents)[1], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-items", type=int, default=200)
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.05, 0.1])
    parser.add_argument("--budget-tokens", type=int, nargs="*", default=[], help="whole-prompt budgets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    options = parser.parse_args(argv)
    command = "python -m bench.aggressive " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    log(f"1-min load average at the start: {load_start[0]:.1f}")
    started = time.perf_counter()
    settings = Settings(compression_threshold_tokens=0, compressor_timeout_s=3600)
    items = load_items(options.documents, options.seed)[: options.n_items]
    cuts = [Cut(ratio=r) for r in options.ratios] + [Cut(budget_tokens=b) for b in options.budget_tokens]
    if not cuts:
        parser.error("give --ratios or --budget-tokens")
    results = asyncio.run(run(items, cuts, settings))
    section = report(results, cuts, len(items), options.documents, command.strip(),
                     time.perf_counter() - started, (load_start, os.getloadavg()))
    publish(section, RESULTS_DIR / f"{section_name(options.documents)}.md", None if options.no_docs else BENCHMARKS_MD,
            marks(options.documents))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
