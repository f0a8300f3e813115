"""What each QR-head configuration costs per context token, side by side in one run (issue 18's
CPU bar: <= 0.30 ms per context token at 2 k tokens, and at 27 k no more than 1.2x that).

Every configuration (a head set, optionally with a LoRA adapter) is loaded once in this process,
as the Compressor loads it in ``CCPROXY_SCORING_MODE=qrhead``; then, for each context size, the
configurations are timed in turn, ``--repeats`` rounds, and each keeps its fastest call: other
jobs on the machine only ever add time, and interleaving spreads what they add over every
configuration alike. The contexts are NQ documents (``bench.scorer_cost``'s: 15 and 200).

    .venv/bin/python -m bench.head_cost              # ~20 min on 2 cores of a float32 host (27 k: ~5 min a round)
    .venv/bin/python -m bench.head_cost --configs smollm2-135m-instruct \\
        smollm2-135m-instruct-hard+smollm2-traces-lora --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_CONFIGS = ("smollm2-135m-instruct", "smollm2-135m-instruct-hard+smollm2-traces-lora",
                   "smollm2-135m-instruct-fast")
SIZES = {"2k": 15, "27k": 200}  # NQ documents per context


@dataclass(frozen=True)
class Config:
    head_set: str
    adapter: str | None

    @property
    def label(self) -> str:
        return self.head_set + (f" + {self.adapter}" if self.adapter else "")


def parse_config(text: str) -> Config:
    """``HEAD_SET`` or ``HEAD_SET+ADAPTER`` (both shipped names)."""
    head_set, _, adapter = text.partition("+")
    return Config(head_set, adapter or None)


def per_token_ms(seconds: float, tokens: int) -> float:
    return 1000.0 * seconds / tokens


def flatness(ms_2k: float, ms_27k: float) -> float:
    """The 27 k per-token cost over the 2 k one (the bar: <= 1.2)."""
    return ms_27k / ms_2k


def format_table(results: dict[str, dict[str, float]], tokens: dict[str, int]) -> str:
    lines = ["| configuration | deepest layer | ms/token at 2k | ms/token at 27k | 27k / 2k |",
             "|---|---:|---:|---:|---:|"]
    for label, row in results.items():
        lines.append(f"| {label} | {int(row['deepest'])} | {row['2k']:.3f} | {row['27k']:.3f} | "
                     f"{flatness(row['2k'], row['27k']):.2f} |")
    sizes = ", ".join(f"{name}: {count:,} context tokens" for name, count in tokens.items())
    return "\n".join(lines) + f"\n\n({sizes}; each the fastest of its rounds.)"


def load_line(when: str) -> str:
    return f"1-min load average at the {when}: {os.getloadavg()[0]:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="HEAD_SET or HEAD_SET+ADAPTER, shipped names")
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
        settings = Settings(scoring_mode="qrhead", scoring_head_set=config.head_set,
                            scoring_lora_path=config.adapter)
        scorers[config.label] = load_scorer(settings)
    contexts = {name: _documents(n) for name, n in SIZES.items()}
    tokenizer = next(iter(scorers.values())).tokenizer
    tokens = {name: sum(len(ids) for ids in tokenizer(units, add_special_tokens=False).input_ids)
              for name, (_, units) in contexts.items()}
    best = {label: {name: float("inf") for name in SIZES} for label in scorers}
    for scorer in scorers.values():
        query, units = contexts["2k"]
        scorer.score(query, units[:4])  # warm-up: first-call allocations are not timed
    for name, (query, units) in contexts.items():
        for round_number in range(args.repeats):
            for label, scorer in scorers.items():
                start = time.perf_counter()
                scorer.score(query, units)
                best[label][name] = min(best[label][name], time.perf_counter() - start)
            print(f"{name} round {round_number + 1}: " + ", ".join(
                f"{label} {per_token_ms(best[label][name], tokens[name]):.3f}" for label in scorers), flush=True)
    results = {label: {"deepest": float(max(layer for layer, _ in scorers[label].heads)),
                       **{name: per_token_ms(best[label][name], tokens[name]) for name in SIZES}}
               for label in scorers}
    print()
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}; "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    print(format_table(results, tokens))
    print(load_line("end"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
