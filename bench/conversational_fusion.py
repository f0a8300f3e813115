"""Fusion variants on the conversational traces, redone offline from one scoring pass.

For each trace of ``bench.conversational`` the encoder scores every tool result once, the QR heads
score the encoder's pre-filtered units once (as the default scorer does), and BM25 scores them
all; then each variant fuses those stored scores and the policy keeps 10 and 20 % of the tool
output. Variants: the encoder alone, BM25 alone, the heads over the pre-filtered units, z-score
fusion at QR weights 0.0-0.9, reciprocal-rank fusion, and a higher QR weight for code-like
units (share of symbol characters over a threshold). Also: whether the pre-filter kept the needed
result at several sizes.

    .venv/bin/python -m bench.conversational_fusion --corpus-rev HEAD     # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.agent_traces import CORPUS_REV_HELP, build_traces, repo_corpus, tree_state
from bench.conversational import cases

SYMBOLS = frozenset("{}[]()<>=_/\\:;#|`$\"'*&%@")
Row = dict[str, Any]


def symbol_share(text: str) -> float:
    return sum(ch in SYMBOLS for ch in text) / max(1, len(text))


def collect(traces: int, min_steps: int, max_steps: int, seed: int, corpus_rev: str | None) -> list[Row]:
    from ccproxy.compression.lexical import bm25_scores
    from ccproxy.compression.scoring import fused_scorer, load_scorer
    from ccproxy.settings import Settings

    qr = load_scorer(Settings(scoring_mode="qrhead"))
    fused = fused_scorer(qr, Settings())
    built = build_traces(traces, min_steps, max_steps, seed, corpus=repo_corpus(revision=corpus_rev))
    rows = []
    for case in cases(built, qr.tokenizer):
        query = case.trace.question
        dense = fused.dense.scores_many([(query, case.units)])[0]
        kept = fused.rescored_units(case.units, dense)
        rows.append({
            "kind": case.trace.kind, "gold": case.gold, "tokens": case.unit_tokens, "dense": dense, "kept": kept,
            "qr": qr.score(query, [case.units[i] for i in kept]), "bm25": bm25_scores(query, case.units),
            "symbols": [symbol_share(unit) for unit in case.units],
        })
        print(f"trace {case.trace.number} ({case.trace.kind}) scored", file=sys.stderr, flush=True)
    return rows


def fused_variant(row: Row, weight: float, method: str = "zscore", code_weight: float | None = None,
                  threshold: float = 0.04) -> list[float]:
    from ccproxy.compression.fusion import fuse, merge_prefiltered, zscore

    kept = row["kept"]
    dense_kept = [row["dense"][i] for i in kept]
    if code_weight is None:
        scores = fuse(row["qr"], dense_kept, method, weight)  # type: ignore[arg-type]
    else:
        qz, dz = zscore(row["qr"]), zscore(dense_kept)
        scores = []
        for j, i in enumerate(kept):
            w = code_weight if row["symbols"][i] > threshold else weight
            scores.append(w * qz[j] + (1 - w) * dz[j])
    return merge_prefiltered(row["dense"], kept, scores)


def kept_counts(rows: Sequence[Row], score: Callable[[Row], list[float]]) -> dict[str, tuple[int, int]]:
    from ccproxy.compression.policy import select

    out: dict[str, list[int]] = {"all": [0, 0], "coding": [0, 0], "research": [0, 0]}
    for row in rows:
        scores = score(row)
        total = sum(row["tokens"])
        for b, share in enumerate((0.10, 0.20)):
            keep = select(row["tokens"], scores, [False] * len(scores), int(total * share))
            if keep[row["gold"]]:
                out["all"][b] += 1
                out[row["kind"]][b] += 1
    return {kind: (a, b) for kind, (a, b) in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=20)
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--corpus-rev", metavar="REV", help=CORPUS_REV_HELP)
    options = parser.parse_args(argv)

    import torch

    from bench.compressor_bench import cpu_name
    from bench.load import run_line
    from ccproxy.compression.fusion import prefilter

    torch.set_num_threads(2)
    command = "python -m bench.conversational_fusion " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start, started = os.getloadavg(), time.perf_counter()
    rows = collect(options.traces, options.min_steps, options.max_steps, options.seed, options.corpus_rev)
    variants: dict[str, Callable[[Row], list[float]]] = {
        "MiniLM alone": lambda r: r["dense"],
        "BM25 alone": lambda r: r["bm25"],
        "QR heads over the pre-filtered units": lambda r: fused_variant(r, 1.0),
    }
    for weight in (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9):
        variants[f"z-score fusion, QR weight {weight}"] = lambda r, w=weight: fused_variant(r, w)
    variants["reciprocal-rank fusion, 0.5"] = lambda r: fused_variant(r, 0.5, "rrf")
    for code_weight in (0.7, 0.8, 0.9, 1.0):
        for threshold in (0.03, 0.05):
            variants[f"QR weight {code_weight} on code-like units (> {threshold:.0%} symbols), else 0.3"] = (
                lambda r, c=code_weight, t=threshold: fused_variant(r, 0.3, code_weight=c, threshold=t))
    print(run_line(command, f"{cpu_name()}, 2 torch threads", (time.perf_counter() - started) / 60,
                   (load_start[0], os.getloadavg()[0])))
    print(f"{len(rows)} traces, coding ones cut from {tree_state(options.corpus_rev)}")
    print("| variant | kept 10 % | kept 20 % | coding 10/20 % | research 10/20 % |\n|---|---:|---:|---:|---:|")
    for name, score in variants.items():
        counts = kept_counts(rows, score)
        print(f"| {name} | {counts['all'][0]} | {counts['all'][1]} | {counts['coding'][0]}/{counts['coding'][1]} | "
              f"{counts['research'][0]}/{counts['research'][1]} |")
    for size in (8000, 5000, 4000):
        held = sum(r["gold"] in (prefilter(r["dense"], size, r["tokens"]) if sum(r["tokens"]) > size
                                 else range(len(r["tokens"]))) for r in rows)
        print(f"pre-filter of {size:,} tokens keeps the needed result in {held} of {len(rows)} traces")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
