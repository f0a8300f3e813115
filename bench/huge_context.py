"""Huge contexts: the default scorer with and without BM25 in front of the encoder (issue 18).

Each item is an evaluation question with its 200 hard-distractor documents, and every other
passage of the data file that does not hold its answer inserted at random places (about
1,000 documents, ~120 k scoring-model tokens: a full 128 k context window). Arms, all from
the same pass over the same items:

- *default, encoder uncapped*: ``CCPROXY_SCORING_ENCODER_MAX_TOKENS=0``: MiniLM reads every unit,
  then the QR heads rescore its best 8,000 tokens (the scorer before this change);
- *default* (shipped): BM25 picks what MiniLM reads, up to 32,000 of its tokens (``LexicalFirst``);
- *MiniLM alone* and *BM25 alone*, for reference.

Times are the scorer's own per item (the encoder's pass shared by the first and third arm is
timed once and charged to both). Budgets as in the compressor benchmark (policy ``select``):
5/10/20 % of the document tokens and 4,000 tokens for the whole prompt.

    .venv/bin/python -m bench.huge_context --n-items 8      # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.compressor_bench import TokenCounter, budget_column, cpu_name, evaluate, gold_kept_cells, prepare
from bench.load import publish, run_line
from bench.multiturn import load_items
from nqdata.items import Item, contains_answer, load_records

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
RESULTS_MD = ROOT / "bench" / "results" / "huge_context.md"
MARKS = ("<!-- huge-context:start -->", "<!-- huge-context:end -->")
ARMS = ("uncapped", "capped", "minilm", "bm25")
LABELS = {
    "uncapped": "default, encoder uncapped (before)",
    "capped": "default, BM25 first (shipped)",
    "minilm": "MiniLM alone, uncapped",
    "bm25": "BM25 alone",
}
BUDGETS = ("5%", "10%", "20%", "4000")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def huge_items(n_items: int, seed: int) -> list[Item]:
    """Each item's 200 documents plus every other passage of the file without its answer."""
    records = load_records("train") + load_records("eval")
    passages = {record.gold.text: record.gold for record in records}
    items = []
    rng = random.Random(seed)
    for item in load_items(200, seed)[:n_items]:
        present = {passage.text for passage in item.documents}
        filler = [
            p for text, p in passages.items()
            if text not in present and not contains_answer(f"{p.title} {p.text}", item.record.answers)
        ]
        documents = list(item.documents)
        gold = documents[item.gold_index]
        for passage in filler:
            documents.insert(rng.randrange(len(documents) + 1), passage)
        items.append(Item(item.record, tuple(documents), documents.index(gold)))
    return items


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def table(rows: dict[str, list[dict[str, Any]]], seconds: dict[str, list[float]]) -> list[str]:
    lines = [
        "| scorer | seconds per item | gold in top 4 | "
        + " | ".join(budget_column(b) for b in BUDGETS) + " |",
        "|---|---:|---:|" + "---:|" * len(BUDGETS),
    ]
    for arm in ARMS:
        mine = rows[arm]
        cells = [LABELS[arm], f"{_mean(seconds[arm]):.1f}", f"{_mean([r['gold_rank'] <= 4 for r in mine]):.3f}"]
        cells += gold_kept_cells(mine, BUDGETS)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-items", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    options = parser.parse_args(argv)
    command = "python -m bench.huge_context " + shlex.join(argv if argv is not None else sys.argv[1:])

    import torch

    from ccproxy.compression.lexical import LexicalFirst, bm25_scores
    from ccproxy.compression.scoring import load_scorer
    from ccproxy.settings import Settings

    torch.set_num_threads(options.threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    settings = Settings()
    fused = load_scorer(settings.model_copy(update={"scoring_encoder_max_tokens": 0}))
    encoder = fused.dense
    capped = LexicalFirst(encoder, settings.scoring_encoder_max_tokens)
    counter = TokenCounter()
    rows: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    tokens = []
    items = huge_items(options.n_items, options.seed)
    fused.score(items[0].question, items[0].document_texts()[:3])  # warm-up
    for n, item in enumerate(items):
        prepared = prepare(item, counter)
        tokens.append(prepared.context_tokens)
        query, units = item.question, item.document_texts()
        t0 = time.perf_counter()
        dense = encoder.scores(query, units)
        t1 = time.perf_counter()
        uncapped = fused.score_with_dense(query, units, dense)
        t2 = time.perf_counter()
        bounded = fused.score_with_dense(query, units, capped.scores_many([(query, units)])[0])
        t3 = time.perf_counter()
        lexical = bm25_scores(query, units)
        t4 = time.perf_counter()
        for arm, scores, spent in (("uncapped", uncapped, t2 - t0), ("capped", bounded, t3 - t2),
                                   ("minilm", dense, t1 - t0), ("bm25", lexical, t4 - t3)):
            rows[arm].append(evaluate(prepared, scores, counter))
            seconds[arm].append(spent)
        log(f"{n + 1}/{len(items)}: {len(units)} documents, {prepared.context_tokens:,} tokens; "
            f"uncapped {t2 - t0:.1f} s rank {rows['uncapped'][-1]['gold_rank']}, "
            f"capped {t3 - t2:.1f} s rank {rows['capped'][-1]['gold_rank']}")
    n_items = len(rows["capped"])
    lines = [
        MARKS[0],
        "## Huge contexts: BM25 in front of the encoder",
        "",
        run_line(command, f"{cpu_name()}, {options.threads} torch threads", (time.perf_counter() - started) / 60,
                 (load_start[0], os.getloadavg()[0])),
        "",
        f"{n_items} items of the evaluation part: each question's 200 hard-distractor documents and every other "
        f"passage of the data file without its answer, inserted at random places ({_mean([len(i.documents) for i in items]):,.0f} "
        f"documents, mean {_mean(tokens):,.0f} scoring-model tokens). *default, encoder uncapped*: "
        "`CCPROXY_SCORING_ENCODER_MAX_TOKENS=0`, MiniLM reads every document and the QR heads rescore its best "
        f"{settings.scoring_prefilter_tokens:,} tokens; *BM25 first*: the shipped default, BM25 picks the documents MiniLM "
        f"reads, up to {settings.scoring_encoder_max_tokens:,} of its tokens, the rest rank below in BM25 order. "
        "Budgets as in the compressor benchmark (policy `select`; @4k: 4,000 tokens for the whole prompt). "
        "Seconds: the scorer's own time per item (MiniLM alone is the first arm's encoder pass).",
        "",
        *table(rows, seconds),
        "",
        MARKS[1],
        "",
    ]
    publish("\n".join(lines), RESULTS_MD, None if options.no_docs else BENCHMARKS_MD, MARKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
