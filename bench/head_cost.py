"""What each QR-head configuration costs per context token, side by side in one run (issue 18's
CPU bar: <= 0.30 ms per context token at 2 k tokens, and at 27 k no more than 1.2x that).

Every configuration (a head set, optionally with a LoRA adapter and a window plan) is loaded once
in this process, as the Compressor loads it in ``CCPROXY_SCORING_MODE=qrhead``; then, for each
context size, the configurations are timed in turn, ``--repeats`` rounds, and each keeps its
fastest call: other jobs on the machine only ever add time, and interleaving spreads what they
add over every configuration alike. The contexts are NQ documents (``bench.scorer_cost``'s:
15 and 200 by default; ``--documents`` adds sizes in between).

    .venv/bin/python -m bench.head_cost              # ~20 min on 2 cores of a float32 host (27 k: ~5 min a round)
    .venv/bin/python -m bench.head_cost --configs smollm2-135m-instruct \\
        smollm2-135m-instruct-hard+smollm2-traces-lora --repeats 5
    .venv/bin/python -m bench.head_cost --configs smollm2-135m-instruct-fast \\
        smollm2-135m-instruct-fast@2560/0 --documents 15 20 40 80 200   # 2,560-token windows, none shared
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_CONFIGS = ("smollm2-135m-instruct", "smollm2-135m-instruct-hard+smollm2-traces-lora",
                   "smollm2-135m-instruct-fast")
DEFAULT_DOCUMENTS = (15, 200)  # NQ documents per context: ~2 k and ~27 k tokens, the bar's two points


@dataclass(frozen=True)
class Config:
    head_set: str
    adapter: str | None
    window: tuple[int, int] | None = None  # (window tokens, overlap tokens); None: the settings' defaults

    @property
    def label(self) -> str:
        window = f" @ {self.window[0]}/{self.window[1]}" if self.window else ""
        return self.head_set + (f" + {self.adapter}" if self.adapter else "") + window


def parse_config(text: str) -> Config:
    """``HEAD_SET[+ADAPTER][@WINDOW/OVERLAP]``: shipped names, and the QR windows' size and shared
    tokens (CCPROXY_SCORING_WINDOW_TOKENS, CCPROXY_SCORING_WINDOW_OVERLAP_TOKENS)."""
    names, _, window = text.partition("@")
    head_set, _, adapter = names.partition("+")
    if not window:
        return Config(head_set, adapter or None)
    tokens, _, overlap = window.partition("/")
    return Config(head_set, adapter or None, (int(tokens), int(overlap or 0)))


def per_token_ms(seconds: float, tokens: int) -> float:
    return 1000.0 * seconds / tokens


def flatness(costs: Sequence[float]) -> float:
    """The highest per-token cost over the first (smallest) context's (the bar, 27 k against 2 k: <= 1.2)."""
    return max(costs) / costs[0]


def size_label(tokens: int) -> str:
    return f"{tokens / 1000:.1f}k"


def format_table(results: dict[str, dict[str, float]], tokens: Sequence[int]) -> str:
    """``results``: per configuration, its deepest layer and its ms/token at each context size."""
    sizes = [size_label(n) for n in tokens]
    lines = ["| configuration | deepest layer | " + " | ".join(f"ms/token at {s}" for s in sizes)
             + f" | highest / {sizes[0]} |",
             "|---|---:|" + "---:|" * (len(sizes) + 1)]
    for label, row in results.items():
        costs = [row[s] for s in sizes]
        lines.append(f"| {label} | {int(row['deepest'])} | " + " | ".join(f"{c:.3f}" for c in costs)
                     + f" | {flatness(costs):.2f} |")
    counts = ", ".join(f"{n:,}" for n in tokens)
    return "\n".join(lines) + f"\n\n(Context tokens: {counts}; each the fastest of its rounds.)"


def load_line(when: str) -> str:
    return f"1-min load average at the {when}: {os.getloadavg()[0]:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="HEAD_SET[+ADAPTER][@WINDOW/OVERLAP]: shipped names, window plan in tokens")
    parser.add_argument("--documents", type=int, nargs="+", default=list(DEFAULT_DOCUMENTS),
                        help="NQ documents per context, smallest first (15: ~2 k tokens, 200: ~27 k)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from bench.scorer_cost import _documents
    from ccproxy.compression.scoring import load_scorer
    from ccproxy.settings import Settings

    torch.set_num_threads(args.threads)
    print(load_line("start"), flush=True)
    started = time.perf_counter()
    configs = [parse_config(text) for text in args.configs]
    scorers = {}
    for config in configs:
        window = ({"scoring_window_tokens": config.window[0], "scoring_window_overlap_tokens": config.window[1]}
                  if config.window else {})
        settings = Settings(scoring_mode="qrhead", scoring_head_set=config.head_set,
                            scoring_lora_path=config.adapter, **window)
        scorers[config.label] = load_scorer(settings)
    tokenizer = next(iter(scorers.values())).tokenizer
    contexts, tokens = {}, []
    for n in args.documents:
        query, units = _documents(n)
        tokens.append(sum(len(ids) for ids in tokenizer(units, add_special_tokens=False).input_ids))
        contexts[size_label(tokens[-1])] = (query, units)
    best = {label: {name: float("inf") for name in contexts} for label in scorers}
    for scorer in scorers.values():
        query, units = next(iter(contexts.values()))
        scorer.score(query, units[:4])  # warm-up: first-call allocations are not timed
    for (name, (query, units)), n_tokens in zip(contexts.items(), tokens, strict=True):
        for round_number in range(args.repeats):
            for label, scorer in scorers.items():
                start = time.perf_counter()
                scorer.score(query, units)
                best[label][name] = min(best[label][name], time.perf_counter() - start)
            print(f"{name} round {round_number + 1}: " + ", ".join(
                f"{label} {per_token_ms(best[label][name], n_tokens):.3f}" for label in scorers), flush=True)
    results = {label: {"deepest": float(max(layer for layer, _ in scorers[label].heads)),
                       **{name: per_token_ms(best[label][name], n) for name, n in zip(contexts, tokens, strict=True)}}
               for label in scorers}
    print()
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}; "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    print(format_table(results, tokens))
    print(load_line("end"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
