"""Compressor benchmark: does the gold passage (and the answer) survive compression?

Multi-document QA from the EVALUATION part of the NQ file (``nqdata/items.py``): one gold passage,
random or mined (BM25 + MiniLM) distractors, the question last. Every method gives one score per
document; the product's policy (``ccproxy.compression.policy``) then keeps the best documents that
fit the budget, so methods differ only in their scores. Budgets: 10/20/30 % of the document
tokens, and at 200 documents an absolute 4,000-token budget for the whole prompt.

Besides the baselines, the product's dense options (``ccproxy.compression.fused``): QR heads and
the MiniLM encoder fused, the encoder as a pre-filter, or both. Every document's score goes into
the per-item JSON, so ``--sweep`` can recompute fusions with other weights without rescoring.

    .venv/bin/python -m bench.compressor_bench                      # the full run
    .venv/bin/python -m bench.compressor_bench --sizes 20 --distractors hard --n-items 50
    .venv/bin/python -m bench.compressor_bench --sweep bench/results/compressor_items.json
    .venv/bin/python -m bench.compressor_bench --replay bench/results/compressor_items.json \
        --out bench/results/compressor.md --plot docs/compressor_kept_rate.png   # budgets recomputed
    .venv/bin/python -m bench.compressor_bench --sizes 20 --distractors hard --n-items 200 \
        --methods qrhead qrhead-lora --adapter /tmp/qr-lora     # a QR-head LoRA against the base

``qrhead-lora`` is ``qrhead`` with a LoRA adapter from ``training/train_qr_lora.py`` on the scoring
model, scoring with the head set the adapter was trained for (its ``heads.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ccproxy.compression.fusion import FUSION_METHODS
from ccproxy.compression.policy import allowance, select
from ccproxy.settings import Settings
from nqdata.items import Item, contains_answer, hard_distractor_items, load_records, random_distractor_items

ROOT = Path(__file__).resolve().parents[1]
FUSION = "qrhead+minilm"  # the product's FusedScorer, mode "fusion"
PREFILTER = "minilm>qrhead"  # mode "qrhead-prefiltered"
LORA = "qrhead-lora"  # `qrhead` with the --adapter LoRA
BOTH = "minilm>qrhead+minilm"  # mode "fusion-prefiltered": pre-filter, then fusion on what it kept
METHODS = ("qrhead", "icr", "bm25", "minilm", "dense", FUSION, PREFILTER, BOTH, "recent", "random")
ALL_METHODS = (*METHODS, LORA)  # LORA only with --adapter
RATIOS = (0.05, 0.1, 0.2, 0.3)
ABSOLUTE_BUDGET = 4000
SEPARATOR = "\n\n"
ABSOLUTE_BUDGET_MIN_DOCS = 200  # a 4k budget means nothing for a 2.5k-token prompt
SMOLLM2_LAYERS = 30  # SmolLM2-135M; only used to name ICR's layers in the report
INSTRUCTION = (
    "Write a high-quality answer for the given question using only the provided search "
    "results (some of which might be irrelevant)."
)

Scorer = Callable[[Item], list[float]]


# --- methods: name -> one score per document --------------------------------------------------


class Charged:
    """Memoises a scorer per (query, units) and books the seconds each result took.

    The combined methods run the product's ``FusedScorer`` on top of the same QR-head and encoder
    passes as the ``qrhead`` and ``dense`` rows: a pass is computed once per item, and every method
    that uses it is charged its full time, as if it had run it alone.
    """

    def __init__(self, scorer: Any, call: str) -> None:
        self._call = getattr(scorer, call)
        self.tokenizer = getattr(scorer, "tokenizer", None)
        self._cache: dict[tuple[str, tuple[str, ...]], tuple[list[float], float]] = {}
        self.charged = 0.0  # seconds booked to whoever asked
        self.spent = 0.0  # seconds actually computed

    def _get(self, query: str, units: Sequence[str]) -> list[float]:
        key = (query, tuple(units))
        if key not in self._cache:
            t0 = time.perf_counter()
            scores = list(self._call(query, list(units)))
            seconds = time.perf_counter() - t0
            self._cache[key] = (scores, seconds)
            self.spent += seconds
        scores, seconds = self._cache[key]
        self.charged += seconds
        return list(scores)

    score = scores = _get

    # FusedScorer asks its two scorers in batches (QRHeadScorer.score_batch, DenseEncoder.scores_many).
    def score_batch(self, requests: Sequence[tuple[Any, ...]]) -> list[list[float]]:
        return [self._get(request[0], request[1]) for request in requests]

    def scores_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        return [self._get(query, units) for query, units in requests]

    def forget(self) -> None:
        self._cache.clear()


@dataclass
class Options:
    seed: int
    fusion_method: str
    fusion_weight: float
    prefilter_tokens: int
    adapter: str | None = None
    shared: dict[str, Charged] = field(default_factory=dict)

    @property
    def charged(self) -> list[Charged]:
        return list(self.shared.values())


def scorer_env(settings: Any) -> str:
    """The scorer settings a run was given that are not the defaults, as the environment
    assignments that reproduce it (they are part of what the run measured)."""
    fields = type(settings).model_fields
    names = ("scoring_head_set", "scoring_window_tokens", "scoring_window_overlap_tokens")
    return "".join(f"CCPROXY_{name.upper()}={shlex.quote(str(getattr(settings, name)))} " for name in names
                   if getattr(settings, name) != fields[name].default)


def _qr_scorer(heads_from_file: bool, adapter: str | None = None) -> Any:
    from ccproxy.compression.adapters import resolve_adapter
    from ccproxy.compression.model import load_scoring_model
    from ccproxy.compression.qrhead import QRHeadScorer
    from ccproxy.compression.scoring import load_scorer
    from ccproxy.settings import Settings

    if heads_from_file:
        # The Compressor's own QR scorer: its head set (CCPROXY_SCORING_HEAD_SET, else the model's
        # or the adapter's; none raises NoHeadSet: without one the scorer would be ICR's heads, not
        # "qrhead") and its window settings. The adapter is this run's --adapter, not the environment's.
        return load_scorer(Settings(scoring_mode="qrhead", scoring_lora_path=adapter))
    loaded = load_scoring_model(adapter=str(resolve_adapter(adapter)) if adapter else None)
    return QRHeadScorer(loaded.model, loaded.tokenizer, None)


def dense_dtype() -> Any:
    """The product's choice for the encoder (``scoring.fused_scorer``): the CPU's fast dtype."""
    from ccproxy.compression.model import default_dtype

    return default_dtype("cpu")


def _shared(name: str, options: Options) -> Charged:
    """The QR-head and encoder passes that several methods share."""
    if name not in options.shared:
        if name == "qrhead":
            options.shared[name] = Charged(_qr_scorer(heads_from_file=True), "score")
        else:
            from ccproxy.compression.dense import load_dense_encoder

            options.shared[name] = Charged(load_dense_encoder(dense_dtype()), "scores")
    return options.shared[name]


def _fused(mode: str, options: Options) -> Scorer:
    from ccproxy.compression.fused import FusedScorer

    fused = FusedScorer(
        _shared("qrhead", options),
        _shared("dense", options),
        mode,  # type: ignore[arg-type]
        method=options.fusion_method,  # type: ignore[arg-type]
        weight=options.fusion_weight,
        prefilter_tokens=options.prefilter_tokens,
    )
    return lambda item: fused.score(item.question, item.document_texts())


def _bm25() -> Scorer:
    from nqdata.retrievers import bm25_scores

    return lambda item: bm25_scores(item.question, item.document_texts()).tolist()


def _minilm() -> Scorer:
    # The reference, as sentence-transformers runs it: float32, documents cut at 256 tokens.
    from nqdata.retrievers import minilm

    encoder = minilm()

    def score(item: Item) -> list[float]:
        vectors = encoder.encode([item.question, *item.document_texts()])
        return (vectors[1:] @ vectors[0]).tolist()

    return score


def _lora(options: Options) -> Scorer:
    if options.adapter is None:
        raise SystemExit(f"{LORA} needs --adapter")
    scorer = _qr_scorer(heads_from_file=True, adapter=options.adapter)
    return lambda item: scorer.score(item.question, item.document_texts())


def _recent() -> Scorer:
    # Later documents score higher, so the policy keeps the last ones that fit.
    return lambda item: [float(i) for i in range(len(item.documents))]


def _random(seed: int) -> Scorer:
    def score(item: Item) -> list[float]:
        rng = random.Random(f"{seed}-{item.record.line}-{len(item.documents)}")
        return [rng.random() for _ in item.documents]

    return score


def make_scorer(name: str, options: Options) -> Scorer:
    def icr() -> Scorer:
        scorer = _qr_scorer(heads_from_file=False)
        return lambda item: scorer.score(item.question, item.document_texts())

    def shared(key: str) -> Callable[[], Scorer]:
        def make() -> Scorer:
            charged = _shared(key, options)
            return lambda item: charged.score(item.question, item.document_texts())

        return make

    factories: dict[str, Callable[[], Scorer]] = {
        "qrhead": shared("qrhead"),
        "icr": icr,
        "bm25": _bm25,
        "minilm": _minilm,
        "dense": shared("dense"),
        FUSION: lambda: _fused("fusion", options),
        PREFILTER: lambda: _fused("qrhead-prefiltered", options),
        BOTH: lambda: _fused("fusion-prefiltered", options),
        "recent": _recent,
        "random": lambda: _random(options.seed),
        LORA: lambda: _lora(options),
    }
    return factories[name]()


# --- one item --------------------------------------------------------------------------------


class TokenCounter:
    """Counts with the compressor model's own tokenizer (SmolLM2, from the shipped GGUF)."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        from ccproxy.embedded import embedded_gguf_path

        path = embedded_gguf_path()
        self._tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # Between two texts "\n\n" costs two tokens ("\n", "\n"), at a text's end only one, as
        # the pre-tokenizer splits whitespace before a word: measure it in context.
        self.separator = self.one(f"a{SEPARATOR}b") - self.one("a") - self.one("b")

    def many(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self._tokenizer(list(texts), add_special_tokens=False).input_ids]

    def one(self, text: str) -> int:
        return self.many([text])[0]


@dataclass
class Prepared:
    """What every method shares for one item: units, their token counts, where answers are."""

    item: Item
    documents: list[str]
    unit_tokens: list[int]  # instruction, documents..., question
    protected: list[bool]
    has_answer: list[bool]  # per document
    prompt_tokens: int

    @property
    def context_tokens(self) -> int:
        return sum(self.unit_tokens[1:-1])

    def question_block(self) -> str:
        return f"Question: {self.item.question}\nAnswer:"

    def prompt(self, kept_documents: Sequence[str]) -> str:
        # The same layout as Item.messages(), documents keep their original numbers.
        return "".join(f"{text}{SEPARATOR}" for text in [INSTRUCTION, *kept_documents]) + self.question_block()


def prepare(item: Item, counter: TokenCounter) -> Prepared:
    documents = item.document_texts()
    prepared = Prepared(item, documents, [], [], [], 0)
    # Each unit carries the separator after it, so the kept units add up to the real prompt.
    counts = counter.many([INSTRUCTION, *documents, prepared.question_block()])
    prepared.unit_tokens = [n + counter.separator for n in counts[:-1]] + counts[-1:]
    prepared.protected = [True] + [False] * len(documents) + [True]
    # Title and text only: the rendered "Document [n]" would match numeric answers such as "3".
    prepared.has_answer = [contains_answer(f"{p.title} {p.text}", item.record.answers) for p in item.documents]
    prepared.prompt_tokens = counter.one(prepared.prompt(documents))
    return prepared


def evaluate(prepared: Prepared, scores: Sequence[float], counter: TokenCounter) -> dict[str, Any]:
    unit_scores = [0.0, *scores, 0.0]
    gold = prepared.item.gold_index
    # Ties ranked as the policy breaks them: the later document first.
    rank = 1 + sum(1 for j, s in enumerate(scores) if (s, j) > (scores[gold], gold))
    budgets: dict[str, Any] = {}
    plans: list[tuple[str, int]] = [
        (f"{round(r * 100)}%", allowance(prepared.unit_tokens, prepared.protected, ratio=r)) for r in RATIOS
    ]
    if len(prepared.documents) >= ABSOLUTE_BUDGET_MIN_DOCS:
        plans.append(
            (str(ABSOLUTE_BUDGET), allowance(prepared.unit_tokens, prepared.protected, budget_tokens=ABSOLUTE_BUDGET))
        )
    for label, allowed in plans:
        keep = select(prepared.unit_tokens, unit_scores, prepared.protected, allowed)[1:-1]
        kept = [i for i, k in enumerate(keep) if k]
        result: dict[str, Any] = {
            "gold": keep[gold],
            "answer": any(prepared.has_answer[i] for i in kept),
            "documents": len(kept),
            "kept_context_tokens": sum(prepared.unit_tokens[1 + i] for i in kept),
        }
        if label == str(ABSOLUTE_BUDGET):
            result["prompt_tokens_after"] = counter.one(prepared.prompt([prepared.documents[i] for i in kept]))
        budgets[label] = result
    return {"gold_rank": rank, "budgets": budgets}


# --- running ---------------------------------------------------------------------------------


@dataclass
class Setting:
    n_documents: int
    distractors: str
    n_items: int
    items: list[Prepared] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.n_documents}-{self.distractors}"

    @property
    def title(self) -> str:
        return f"{self.n_documents} documents, {self.distractors} distractors"


def build_items(setting: Setting, seed: int, counter: TokenCounter, split: str = "eval") -> list[Prepared]:
    records = load_records(split)  # type: ignore[arg-type]
    builder = hard_distractor_items if setting.distractors == "hard" else random_distractor_items
    return [prepare(item, counter) for item in builder(records, setting.n_documents, n_items=setting.n_items, seed=seed)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _booked(charged: Sequence[Charged]) -> float:
    return sum(c.charged - c.spent for c in charged)


def run_setting(scorers: dict[str, Scorer], setting: Setting, counter: TokenCounter,
                charged: Sequence[Charged] = ()) -> list[dict[str, Any]]:
    # The first call pays for lazy initialisation (kernels, caches); keep it out of the timings.
    first = setting.items[0].item
    for scorer in scorers.values():
        scorer(Item(first.record, first.documents[:3], min(first.gold_index, 2)))
    rows = []
    started = time.perf_counter()
    for number, prepared in enumerate(setting.items, 1):
        for shared in charged:
            shared.forget()
        # Item-major: every method sees the machine in the same state, whatever else runs on it.
        for name, scorer in scorers.items():
            # Wall time, less what shared passes computed, plus what they booked to this method.
            t0, booked = time.perf_counter(), _booked(charged)
            scores = scorer(prepared.item)
            seconds = time.perf_counter() - t0 + _booked(charged) - booked
            if len(scores) != len(prepared.documents):
                raise RuntimeError(f"{name} gave {len(scores)} scores for {len(prepared.documents)} documents")
            rows.append(
                {
                    "setting": setting.key,
                    "method": name,
                    "line": prepared.item.record.line,
                    "gold_index": prepared.item.gold_index,
                    "n_documents": len(prepared.documents),
                    "context_tokens": prepared.context_tokens,
                    "prompt_tokens": prepared.prompt_tokens,
                    "seconds": seconds,
                    **evaluate(prepared, scores, counter),
                    # Enough to recompute rankings, fusions and budgets without rescoring.
                    "scores": [float(f"{x:.7g}") for x in scores],
                    "document_tokens": prepared.unit_tokens[1:-1],
                }
            )
        if number % 10 == 0 or number == len(setting.items):
            log(f"  {setting.key}: {number}/{len(setting.items)} items ({time.perf_counter() - started:.0f} s)")
    return rows


# --- reporting -------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def budget_column(budget: str) -> str:
    """A budget key of ``evaluate``'s rows as a column heading ("gold kept 10%", "gold kept @4k")."""
    return f"gold kept {'@4k' if budget == str(ABSOLUTE_BUDGET) else budget}"


def gold_kept_cells(rows: Sequence[dict[str, Any]], budgets: Sequence[str]) -> list[str]:
    """Per budget, the share of ``evaluate``'s rows that kept the gold, as table cells."""
    return [f"{_mean([r['budgets'][b]['gold'] for r in rows]):.3f}" for b in budgets]


def ms_per_1k(rows: Sequence[dict[str, Any]]) -> float:
    """Total scoring time over total context tokens, so long items weigh by their length."""
    return 1e6 * sum(r["seconds"] for r in rows) / sum(r["context_tokens"] for r in rows)


def setting_table(setting: Setting, rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    labels = [f"{round(r * 100)}%" for r in RATIOS]
    absolute = setting.n_documents >= ABSOLUTE_BUDGET_MIN_DOCS
    header = ["method", *(f"gold kept {b}" for b in labels), *(f"answer kept {b}" for b in labels), "gold in top 4"]
    if absolute:
        header += ["gold kept @4k", "prompt tokens @4k (mean / max)"]
    header.append("ms / 1k tokens")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        cells = [f"`{method}`"]
        cells += [f"{_mean([r['budgets'][b]['gold'] for r in mine]):.3f}" for b in labels]
        cells += [f"{_mean([r['budgets'][b]['answer'] for r in mine]):.3f}" for b in labels]
        cells.append(f"{_mean([r['gold_rank'] <= 4 for r in mine]):.3f}")
        if absolute:
            after = [r["budgets"][str(ABSOLUTE_BUDGET)]["prompt_tokens_after"] for r in mine]
            cells.append(f"{_mean([r['budgets'][str(ABSOLUTE_BUDGET)]['gold'] for r in mine]):.3f}")
            cells.append(f"{_mean(after):,.0f} / {max(after):,}")
        cells.append(f"{ms_per_1k(mine):,.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(settings: Sequence[Setting], rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    sizes = sorted({s.n_documents for s in settings})
    by_size = {n: [r for r in rows if r["n_documents"] == n] for n in sizes}
    header = ["method"] + [
        f"ms / 1k tokens at {n} docs (~{_mean([r['context_tokens'] for r in by_size[n]]):,.0f} tokens)" for n in sizes
    ] + [f"s / item at {n} docs" for n in sizes]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method in methods:
        mine = {n: [r for r in by_size[n] if r["method"] == method] for n in sizes}
        cells = [f"`{method}`"]
        cells += [f"{ms_per_1k(mine[n]):,.1f}" if mine[n] else "–" for n in sizes]
        cells += [f"{_mean([r['seconds'] for r in mine[n]]):.3f}" if mine[n] else "–" for n in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_dtype() -> str:
    from ccproxy.compression.model import default_dtype

    return str(default_dtype("cpu")).removeprefix("torch.")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(command: str, settings: Sequence[Setting], rows: Sequence[dict[str, Any]], methods: Sequence[str],
           wall_seconds: float, load: tuple[float, float], heads: Sequence[Sequence[int]], options: Options,
           split: str = "eval", replayed: Path | None = None, head_set: str | None = None) -> str:
    import torch

    from ccproxy.compression.qrhead import middle_layers

    middle = middle_layers(SMOLLM2_LAYERS)
    run = (
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_name()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {wall_seconds / 60:.1f} min in all (1-min load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end: other work on the machine slows the timings). "
    )
    if replayed is not None:
        run = (
            f"Replayed {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{replayed.name}` "
            "(`--replay`): that run's scores and timings, every budget recomputed from its stored scores "
            "under the current policy and ratios. "
        )
    parts = [
        "## Compressor benchmark",
        "",
        f"Command: `{command}`",
        "",
        run + 
        f"Scoring model: SmolLM2-135M-Instruct (embedded GGUF, {model_dtype()}). `qrhead`: the head set "
        f"`{head_set or 'shipped'}`, "
        f"{len(heads)} heads (layer, head): {', '.join(f'({layer}, {head})' for layer, head in heads)}. "
        f"`icr`: every head of layers {middle.start}–{middle.stop - 1}. Token counts: SmolLM2 tokenizer, each "
        "document with its separator. Kept rates are shares of items; budgets are shares of the document "
        "tokens, selected by `ccproxy.compression.policy`; \"@4k\" is an absolute budget of 4,000 tokens for "
        "the whole prompt, measured by tokenising the compressed prompt.",
        "",
        f"`minilm`: all-MiniLM-L6-v2 as sentence-transformers runs it (float32, documents cut at 256 "
        f"tokens). `dense`: the same encoder as the product runs it (`ccproxy.compression.dense`: "
        f"{str(dense_dtype()).removeprefix('torch.')} on this CPU, a longer document scores its best "
        f"256-token piece). "
        f"The combined methods are the product's `FusedScorer` over the `qrhead` and `dense` passes (each "
        f"charged the time of both): `{FUSION}` fuses the two scores ({options.fusion_method}, QR-head "
        f"weight {options.fusion_weight:g}); `{PREFILTER}`: on contexts over {options.prefilter_tokens:,} "
        f"tokens the encoder keeps its best {options.prefilter_tokens:,} tokens for the QR heads to "
        f"rescore (shorter contexts: `qrhead`, plus the encoder's time); `{BOTH}` pre-filters the same "
        f"way, then fuses (shorter contexts: `{FUSION}`).",
    ]
    if options.adapter:
        lora_heads = adapter_heads(options.adapter)
        parts += ["", f"`{LORA}`: `qrhead` with the LoRA adapter `{options.adapter}` (training/train_qr_lora.py) "
                  f"on the same model, scoring with the {len(lora_heads)} heads it was trained for: "
                  f"{', '.join(f'({layer}, {head})' for layer, head in lora_heads)}."]
    if split != "eval":
        parts += ["", f"**Items from the {split} part of the NQ file: for choosing settings, not for reporting.**"]
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting.key]
        if not mine:
            continue
        context = _mean([p.context_tokens for p in setting.items])
        prompt = _mean([p.prompt_tokens for p in setting.items])
        parts += [
            "",
            f"### {setting.title} ({len(setting.items)} items; mean {context:,.0f} document tokens, "
            f"{prompt:,.0f} prompt tokens)",
            "",
            setting_table(setting, mine, methods),
        ]
    parts += ["", "### Scoring time", "", timing_table(settings, rows, methods)]
    return "\n".join(parts) + "\n"


def plot(settings: Sequence[Setting], rows: Sequence[dict[str, Any]], methods: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in settings if any(r["setting"] == s.key for r in rows)]
    figure, axes = plt.subplots(2, len(shown), figsize=(4.2 * len(shown), 7), squeeze=False, sharey=True)
    x = [round(r * 100) for r in RATIOS]
    for column, setting in enumerate(shown):
        for row, (metric, label) in enumerate((("gold", "gold passage kept"), ("answer", "answer string kept"))):
            axis = axes[row][column]
            for number, method in enumerate(methods):
                mine = [r for r in rows if r["setting"] == setting.key and r["method"] == method]
                if mine:
                    y = [_mean([r["budgets"][f"{b}%"][metric] for r in mine]) for b in x]
                    # Fixed style per method, so a method looks the same in every panel.
                    axis.plot(x, y, marker="os^Dvx*P<>"[number % 10], color=f"C{number % 10}", label=method)
            axis.set_title(f"{setting.title}\n({len(setting.items)} items)" if row == 0 else "", fontsize=10)
            axis.set_xticks(x)
            axis.set_xlabel("budget (% of document tokens)")
            axis.set_ylim(0, 1.02)
            axis.grid(alpha=0.3)
            if column == 0:
                axis.set_ylabel(label)
    axes[0][0].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- fusion sweep from stored scores ----------------------------------------------------------


def sweep(path: Path, weights: Sequence[float]) -> str:
    """Gold kept per fusion method and QR-head weight, recomputed from the ``qrhead`` and ``dense``
    scores a run stored, under the same policy and ratio budgets (no rescoring)."""
    from ccproxy.compression.fusion import fuse

    document = json.loads(path.read_text(encoding="utf-8"))
    by_item: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in document["items"]:
        by_item.setdefault((row["setting"], row["line"]), {})[row["method"]] = row
    labels = [f"{round(r * 100)}%" for r in RATIOS]
    parts = [f"Fusion sweep over `{path.name}` (`{document['command']}`)"]
    for setting in sorted({key[0] for key in by_item}):
        pairs = [(m["qrhead"], m["dense"]) for (s, _), m in by_item.items() if s == setting and "qrhead" in m and "dense" in m]
        if not pairs:
            continue
        header = ["method", "QR-head weight", *(f"gold kept {b}" for b in labels), "gold first"]
        parts += ["", f"### {setting} ({len(pairs)} items)", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        for method in FUSION_METHODS:
            for weight in weights:
                kept = {b: 0 for b in labels}
                first = 0
                for qr, dense in pairs:
                    scores = fuse(qr["scores"], dense["scores"], method, weight)  # type: ignore[arg-type]
                    tokens, gold = qr["document_tokens"], qr["gold_index"]
                    free = [False] * len(tokens)
                    for ratio, label in zip(RATIOS, labels):
                        kept[label] += select(tokens, scores, free, allowance(tokens, free, ratio=ratio))[gold]
                    first += all((scores[gold], gold) > (x, j) for j, x in enumerate(scores) if j != gold)
                cells = [method, f"{weight:g}", *(f"{kept[b] / len(pairs):.3f}" for b in labels),
                         f"{first / len(pairs):.3f}"]
                parts.append("| " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


# --- entry point -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 200], help="documents per item")
    parser.add_argument("--distractors", nargs="+", choices=["hard", "random"], default=["hard", "random"])
    parser.add_argument(
        "--n-items", type=int, nargs="+", default=[200, 50, 10, 5],
        help="items per setting, in the order sizes x distractors (the last value repeats); "
        "default: 200 for 20 docs/hard, 50 for 20/random, 10 for 200/hard, 5 for 200/random "
        "(about 40 min on 2 idle cores of an AMD EPYC; ICR and QR heads take most of it)",
    )
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS))
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help=f"a LoRA adapter folder (training/train_qr_lora.py), or a shipped adapter's name, for the `{LORA}` method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split", choices=["eval", "train"], default="eval",
        help="NQ part the items come from; `train` only for choosing settings (never reported figures)",
    )
    defaults = Settings.model_fields
    parser.add_argument("--fusion-method", choices=FUSION_METHODS, default=defaults["scoring_fusion_method"].default,
                        help="for the combined methods (default: the product's, CCPROXY_SCORING_FUSION_METHOD)")
    parser.add_argument("--fusion-weight", type=float, default=defaults["scoring_fusion_weight"].default,
                        help="QR-head share in fusion (default: the product's)")
    parser.add_argument("--prefilter-tokens", type=int, default=defaults["scoring_prefilter_tokens"].default,
                        help="contexts over this size: tokens the pre-filter passes to the QR heads "
                        "(default: the product's)")
    parser.add_argument("--replay", type=Path, metavar="JSON",
                        help="recompute every budget of a stored run from its scores (no scoring) and rewrite "
                        "--out, --plot and the JSON")
    parser.add_argument("--sweep", type=Path, metavar="JSON",
                        help="score nothing: print gold kept per fusion method and weight, recomputed from "
                        "the qrhead and dense scores stored in this results file")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compressor.md")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "compressor_items.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "compressor_kept_rate.png")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.adapter and LORA not in args.methods:
        args.methods.append(LORA)
    if args.sweep:
        print(sweep(args.sweep, [round(0.1 * k, 1) for k in range(11)]), end="")
        return 0
    if args.replay:
        counter = TokenCounter()
        settings, rows, stored = replay(args.replay, args.seed, args.split, counter)
        methods = list(dict.fromkeys(row["method"] for row in rows))
        options = Options(args.seed, stored["fusion"]["method"], stored["fusion"]["weight"], stored["prefilter_tokens"],
                          stored.get("adapter"))
        text = report(stored["command"], settings, rows, methods, 0.0, (0.0, 0.0), stored["qrhead_heads"], options,
                      args.split, replayed=args.replay, head_set=stored.get("qrhead_head_set"))
        args.out.write_text(text, encoding="utf-8")
        args.replay.write_text(json.dumps({**stored, "items": rows}, indent=1), encoding="utf-8")
        plot(settings, rows, methods, args.plot)
        print(text)
        return 0
    command = ".venv/bin/python -m bench.compressor_bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    command = (scorer_env(Settings()) + command).rstrip()
    pairs = [(n, kind) for n in args.sizes for kind in args.distractors]
    counts = args.n_items + [args.n_items[-1]] * max(0, len(pairs) - len(args.n_items))
    settings = [Setting(n, kind, count) for (n, kind), count in zip(pairs, counts)]
    print(f"# {command}", flush=True)
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    counter = TokenCounter()
    for setting in settings:
        t0 = time.perf_counter()
        setting.items = build_items(setting, args.seed, counter, args.split)
        log(f"built {setting.key}: {len(setting.items)} items in {time.perf_counter() - t0:.0f} s")
    rows: list[dict[str, Any]] = []
    # Read with the scorers, so the report names the heads that were used even if the file changes.
    heads = shipped_heads()
    options = Options(args.seed, args.fusion_method, args.fusion_weight, args.prefilter_tokens, args.adapter)
    scorers = {name: make_scorer(name, options) for name in args.methods}
    for setting in settings:
        rows += run_setting(scorers, setting, counter, options.charged)
        _write_json(args.json, command, heads, rows, options)
    load = (load_at_start, os.getloadavg()[0])
    text = report(command, settings, rows, args.methods, time.perf_counter() - started, load, heads, options,
                  args.split, head_set=Settings().scoring_head_set)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    plot(settings, rows, args.methods, args.plot)
    log(f"wrote {args.out}, {args.json}, {args.plot}")
    return 0


def replay(path: Path, seed: int, split: str, counter: TokenCounter) -> tuple[list[Setting], list[dict[str, Any]], dict[str, Any]]:
    """A stored run's rows with every budget evaluated again (new ratios, a changed policy) from
    the scores it stored; the items are rebuilt as that run built them (same seed) and checked."""
    document = json.loads(path.read_text(encoding="utf-8"))
    rows: list[dict[str, Any]] = document["items"]
    settings: list[Setting] = []
    for key in dict.fromkeys(row["setting"] for row in rows):
        n_documents, distractors = key.split("-")
        count = len({row["line"] for row in rows if row["setting"] == key})
        setting = Setting(int(n_documents), distractors, count)
        setting.items = build_items(setting, seed, counter, split)
        settings.append(setting)
        by_line = {prepared.item.record.line: prepared for prepared in setting.items}
        for row in (r for r in rows if r["setting"] == key):
            prepared = by_line[row["line"]]
            if prepared.item.gold_index != row["gold_index"] or prepared.unit_tokens[1:-1] != row["document_tokens"]:
                raise SystemExit(f"item at line {row['line']} is not the one {path.name} scored: check --seed")
            row.update(evaluate(prepared, row["scores"], counter))
        log(f"replayed {key}: {count} items")
    return settings, rows, document


def _write_json(path: Path, command: str, heads: Sequence[Sequence[int]], rows: Sequence[dict[str, Any]],
                options: Options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": command,
        "qrhead_heads": list(heads),
        "qrhead_head_set": Settings().scoring_head_set,  # None: the shipped set
        "dense_dtype": str(dense_dtype()).removeprefix("torch."),
        "fusion": {"method": options.fusion_method, "weight": options.fusion_weight},
        "prefilter_tokens": options.prefilter_tokens,
        "adapter": options.adapter,
        "items": list(rows),
    }
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")


def adapter_heads(adapter: str) -> list[tuple[int, int]]:
    from ccproxy.compression.adapters import resolve_adapter
    from ccproxy.compression.heads import scoring_head_set
    from ccproxy.compression.model import EMBEDDED_NAME

    return scoring_head_set(EMBEDDED_NAME, resolve_adapter(adapter)) or []


def shipped_heads() -> list[list[int]]:
    """The heads `qrhead` runs with: CCPROXY_SCORING_HEAD_SET's set when it is set, else the shipped one."""
    from ccproxy.compression.heads import read_head_set
    from ccproxy.compression.model import EMBEDDED_NAME
    from ccproxy.settings import Settings

    return (read_head_set(Settings().scoring_head_set or EMBEDDED_NAME) or {}).get("heads", [])


if __name__ == "__main__":
    raise SystemExit(main())
