"""Weighted QR heads (issue 18, "heads that decide"): SmolLM2's heads re-detected on hard
distractors, optionally on agent traces too, a non-negative weight per head, k and depth chosen on
a held-out slice.

1. Per-head calibrated token scores, every head of every layer (``detect_heads.score_items``), for
   TRAINING-part items with hard distractors (mined by BM25 and MiniLM, ``nqdata.items``), and for
   EVALUATION-part items of the same kind (the report only; nothing is chosen on them). With
   ``--trace-items FILE``, also for agent traces built from training data (written by
   ``bench/trace_items.py``: the units are tool results, the query the final question, the gold
   the one result it needs).
2. Each source's items split by a seeded draw into a fit part and a held-out slice.
3. Each head's QRScore is its mean over the sources of the per-source QRScore on the fit part (so
   a source counts the same whatever its size). For each candidate (k heads, deepest layer): the
   top-k heads by that QRScore, then their non-negative weights fitted on the fit parts: softmax
   cross-entropy of the gold unit over the weighted per-head unit scores (each head thresholded
   on its own, as in detection), each source weighing the same, plus a small L2 term; projected
   gradient steps (the loss is convex in the weights).
4. The candidate, uniform or weighted, with the best held-out top-1 averaged over the sources
   (then MRR, then the shallower and smaller set) wins. Every set is evaluated as the scorer
   scores: the weighted sum of the heads' token scores, then ``unit_scores``.

    python -m training.fit_head_weights --scores-cache /tmp/qrh/hard     # ~45 min on 2 cores
        # rerun with the same cache: seconds. --out FILE writes the winner as a head set.
    python -m bench.trace_items --out /tmp/qrh/trace_items.json      # + agent traces:
    python -m training.fit_head_weights --scores-cache /tmp/qrh/hard --trace-items /tmp/qrh/trace_items.json \
        --n-eval 0 --out ccproxy/compression/heads/smollm2-135m-instruct-mixed.json
    python -m training.fit_head_weights --scores-cache /tmp/qrh/shallow --max-layer 11 --depths 7 8 11 \
        --trace-items /tmp/qrh/trace_items.json --n-eval 0 --out ccproxy/compression/heads/smollm2-135m-instruct-fast.json
        # a shallow set: only layers 0-11 scored (the forward stops there), ~23 min on 2 cores
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from ccproxy.compression.heads import head_pairs, head_weights, load_head_set, read_head_set
from ccproxy.compression.model import load_scoring_model
from ccproxy.compression.qrhead import QRHeadScorer
from nqdata.items import hard_distractor_items, load_records
from training.data import read_units_items, split_items
from training.detect_heads import (
    Head,
    ItemScores,
    all_heads,
    cached_scores,
    dump_json,
    evaluate,
    format_eval_table,
    head_statistics,
    per_head_unit_scores,
    score_items,
    select_heads,
)

CANDIDATE_K = (4, 8, 12, 16, 24, 32)
CANDIDATE_DEPTH = (15, 18, 22, 29)
HARD_SET = "smollm2-135m-instruct-hard"


def fit_weights(features: torch.Tensor, gold: torch.Tensor, *, mask: torch.Tensor | None = None,
                item_weights: torch.Tensor | None = None, l2: float = 1e-3, steps: int = 400,
                lr: float = 0.05) -> torch.Tensor:
    """Non-negative weights [k] for ``features`` [items, k heads, units] that put the ``gold``
    [items] unit first: softmax cross-entropy over each item's units (``mask`` [items, units]:
    False marks padding where items have fewer units), each item's loss times ``item_weights``
    (default: equal), plus ``l2`` |w|^2; Adam steps projected onto w >= 0. Heads are standardised
    first (their scales differ by 100x), so the same ``l2`` and step size suit every head; the
    weights returned apply to the raw scores and average 1."""
    if mask is None:
        mask = torch.ones(features.shape[0], features.shape[2], dtype=torch.bool)
    if item_weights is None:
        item_weights = torch.ones(features.shape[0])
    item_weights = item_weights / item_weights.sum()
    real = features.transpose(0, 1)[:, mask]  # [k, real units]: padding stays out of the scale
    scale = real.std(dim=1).clamp(min=1e-12)
    x = features / scale[None, :, None]
    weights = torch.ones(features.shape[1], requires_grad=True)
    optimiser = torch.optim.Adam([weights], lr=lr)
    for _ in range(steps):
        logits = torch.einsum("k,iku->iu", weights, x).masked_fill(~mask, float("-inf"))
        losses = torch.nn.functional.cross_entropy(logits, gold, reduction="none")
        loss = (losses * item_weights).sum() + l2 * weights.square().sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            weights.clamp_(min=0.0)
    raw = weights.detach() / scale
    return raw / raw.mean().clamp(min=1e-12)


def head_features(scores: Sequence[ItemScores], heads: Sequence[Head], n_heads: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([items, k, units] per-head unit scores, zero-padded to the longest item; [items] gold
    indices; [items, units] mask, False on the padding)."""
    rows = torch.tensor([layer * n_heads + head for layer, head in heads])
    per_head = [units[rows] for units in per_head_unit_scores(scores)]
    width = max(units.shape[1] for units in per_head)
    features = torch.zeros(len(per_head), len(heads), width)
    mask = torch.zeros(len(per_head), width, dtype=torch.bool)
    for i, units in enumerate(per_head):
        features[i, :, : units.shape[1]] = units
        mask[i, : units.shape[1]] = True
    return features, torch.tensor([s.gold for s in scores]), mask


def mean_qrscore(fit_parts: dict[str, Sequence[ItemScores]], n_layers: int, n_heads: int) -> torch.Tensor:
    """[layers, heads] QRScore averaged over the sources, each source's own mean counting once."""
    per_source = [head_statistics(items, n_layers, n_heads)["qrscore"] for items in fit_parts.values()]
    return torch.stack(per_source).mean(dim=0)


def macro_table(tables: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per head set: top-1, top-4 and MRR averaged over the sources' tables (equal weight)."""
    first = next(iter(tables.values()))
    out = {}
    for name, row in first.items():
        out[name] = {**row, **{metric: round(sum(t[name][metric] for t in tables.values()) / len(tables), 4)
                               for metric in ("top1", "top4", "mrr")}}
    return out


def choose(table: dict[str, dict[str, float]]) -> str:
    """Best top-1, then MRR, then the shallower, then the smaller set."""
    return max(table, key=lambda name: (table[name]["top1"], table[name]["mrr"],
                                        -table[name]["deepest_layer"], -table[name]["n_heads"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=150, help="training-part items (fit + held out)")
    parser.add_argument("--n-held-out", type=int, default=50, help="of those, the slice that chooses k and depth")
    parser.add_argument("--n-eval", type=int, default=100, help="evaluation-part items for the report")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--trace-items", type=Path, default=None,
                        help="a second source: agent-trace items from training data (bench/trace_items.py)")
    parser.add_argument("--traces-held-out", type=int, default=40, help="of those, the held-out slice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--depths", type=int, nargs="+", default=list(CANDIDATE_DEPTH),
                        help="candidate deepest layers (the scorer's cost grows with the deepest one)")
    parser.add_argument("--max-layer", type=int, default=None,
                        help="score only the heads of layers <= this (default: every layer; the forward "
                        "stops there, so a shallow search costs a fraction of a full one)")
    parser.add_argument("--scores-cache", type=Path, default=None, help="reuse per-head scores across runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the winner there as a head set file (ccproxy/compression/heads/<name>.json "
                        "is served with CCPROXY_SCORING_HEAD_SET=<name>)")
    args = parser.parse_args(argv)
    if args.max_layer is not None and max(args.depths) > args.max_layer:
        parser.error(f"--depths reach layer {max(args.depths)}, deeper than --max-layer {args.max_layer}")

    model, tokenizer, name = load_scoring_model(None)
    scorer = QRHeadScorer(model, tokenizer, window_tokens=6000)
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    n_heads = scorer.n_heads
    n_layers = len(all_heads(scorer, args.max_layer))  # the layers scored
    # a cache of every layer keeps its old key; a shallow one says how deep it goes
    depth_key = {} if n_layers == scorer.n_layers else {"layers": n_layers}
    key = {"model": name, "dtype": dtype_name, "documents": args.documents, "seed": args.seed, "distractors": "hard",
           **depth_key}
    cache = args.scores_cache

    def scored(split_name: str, n: int) -> list[ItemScores]:
        def compute() -> list[ItemScores]:
            items = hard_distractor_items(load_records(split_name), args.documents, n_items=n, seed=args.seed)
            return score_items(scorer, items, f"per-head scores ({split_name})", args.max_layer)

        return cached_scores(cache and cache.with_suffix(f".{split_name}.pt"), {**key, "n": n, "split": split_name}, compute)

    fit_parts: dict[str, list[ItemScores]] = {}
    held_parts: dict[str, list[ItemScores]] = {}
    fit_parts["hard"], held_parts["hard"] = split_items(scored("train", args.n_train), args.n_held_out, args.seed)
    trace_note = ""
    if args.trace_items:
        file_bytes = args.trace_items.read_bytes()
        trace_source, items = read_units_items(file_bytes.decode("utf-8"))
        trace_key = {"model": name, "dtype": dtype_name, "trace_items": hashlib.sha256(file_bytes).hexdigest(), **depth_key}
        trace_scores = cached_scores(cache and cache.with_suffix(".traces.pt"), trace_key,
                                     lambda: score_items(scorer, items, "per-head scores (agent traces)", args.max_layer))
        fit_parts["traces"], held_parts["traces"] = split_items(trace_scores, args.traces_held_out, args.seed)
        trace_note = f"; plus {trace_source} ({len(fit_parts['traces'])} to fit, {len(held_parts['traces'])} held out)"

    qrscore = mean_qrscore(fit_parts, n_layers, n_heads)
    fit_all = [item for items in fit_parts.values() for item in items]
    # each source weighs the same in the loss, whatever its number of items
    item_weights = torch.cat([torch.full((len(items),), 1.0 / len(items)) for items in fit_parts.values()])
    head_sets: dict[str, list[Head]] = {}
    weights: dict[str, torch.Tensor | None] = {}
    for depth in args.depths:
        for k in CANDIDATE_K:
            heads = select_heads(qrscore, k, depth)
            features, gold, mask = head_features(fit_all, heads, n_heads)
            head_sets[f"top{k} layers<={depth}"] = heads
            weights[f"top{k} layers<={depth}"] = None
            head_sets[f"top{k} layers<={depth} weighted"] = heads
            weights[f"top{k} layers<={depth} weighted"] = fit_weights(
                features, gold, mask=mask, item_weights=item_weights, l2=args.l2)
    # the shipped sets for comparison, where the layers scored hold them
    shipped = load_head_set(name)
    if shipped and max(layer for layer, _ in shipped) < n_layers:
        head_sets["shipped (random-distractor detection)"] = shipped
        weights["shipped (random-distractor detection)"] = None
    hard = read_head_set(HARD_SET)
    if hard and max(layer for layer, _ in head_pairs(hard)) < n_layers:
        head_sets[f"shipped {HARD_SET}"] = head_pairs(hard)
        hard_weights = head_weights(hard)
        weights[f"shipped {HARD_SET}"] = None if hard_weights is None else torch.tensor(hard_weights)

    held_tables = {source: evaluate(items, head_sets, n_heads, weights) for source, items in held_parts.items()}
    for source, table in held_tables.items():
        print(f"\nHeld-out slice, {source}: {len(held_parts[source])} items")
        print(format_eval_table(table))
    held_table = macro_table(held_tables)
    if len(held_tables) > 1:
        print("\nHeld-out, averaged over the sources")
        print(format_eval_table(held_table))
    winner = choose({k: v for k, v in held_table.items() if not k.startswith("shipped")})
    print(f"\nchosen on the held-out slice: {winner}")

    report_sets = {k: head_sets[k] for k in (winner, winner.removesuffix(" weighted"), *(k for k in head_sets if k.startswith("shipped")))}
    evaluation: dict[str, dict[str, float]] = {}
    if args.n_eval:
        eval_scores = scored("eval", args.n_eval)
        evaluation = evaluate(eval_scores, report_sets, n_heads, {k: weights[k] for k in report_sets})
        print(f"\nEvaluation part: {args.n_eval} items x {args.documents} documents, hard distractors")
        print(format_eval_table(evaluation))

    chosen_weights = weights[winner]
    print("\nheads:", head_sets[winner])
    if chosen_weights is not None:
        print("weights:", [round(float(w), 3) for w in chosen_weights])
    if args.out is None:
        return 0
    data: dict[str, object] = {"model": name, "heads": [list(h) for h in head_sets[winner]]}
    if chosen_weights is not None:
        data["weights"] = [round(float(w), 4) for w in chosen_weights]
    held_sizes = " + ".join(f"{len(items)} {source}" for source, items in held_parts.items())
    data["source"] = (f"training/fit_head_weights.py: {winner}, chosen by top-1 on a held-out slice of "
                      f"{held_sizes} training items among k in {list(CANDIDATE_K)}, depth in {args.depths}")
    data["detected_on"] = (f"nqdata.items TRAINING part (NQ-open oracle dev lines 0-499): {len(fit_parts['hard'])} items x "
                           f"{args.documents} documents, hard distractors, seed {args.seed}{trace_note}; {dtype_name} weights")
    report: dict[str, object] = {"held_out": held_table, "evaluation_hard": evaluation}
    if len(held_tables) > 1:
        report["held_out_by_source"] = held_tables
    data["report"] = report
    out = args.out
    out.write_text(dump_json(data), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
