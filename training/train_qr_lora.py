"""Fine-tune the QR heads: a peft LoRA trained on the scorer's own unit scores.

The scoring model runs only up to the deepest selected head, so LoRA goes on the attention
projections (``q_proj``, ``k_proj`` by default) of layers 0..deepest; layers above are never run.
Per example (one question, its gold document and distractors from the same context), the units'
QR-head scores come from ``QRHeadScorer.differentiable_unit_scores``: the very functions the
Compressor serves with, with autograd on. The loss is the softmax cross-entropy of the answering
units among them (a group contrastive objective, as QRRanker trains QR-head scores; several
positives where several units hold an answer), the raw scores divided by a temperature (0.05).
``--loss zscore`` normalises each list's scores first (z-scores), so the temperature means the same
on every list whatever attention mass its heads put on the context; on SmolLM2 it did worse than
the raw scores (docs/TRAINING.md), so it is not the default.

LoRA goes where it is read: on the layers below the deepest selected head every projection asked
for (``--targets``) changes what deeper layers see; on the deepest layer only ``q_proj`` and
``k_proj`` are read (the scorer stops at its keys and the tail's queries), so ``v_proj`` and
``o_proj`` there would be dead weights (``lora_target_modules``).

Data: TRAINING part of the NQ file only (``training/data.py``); a few of its questions are held
out for the periodic checks. ``--trace-items FILE`` (``bench/trace_items.py``: agent traces built
from training data) adds a second source: each step then takes ``--traces-per-batch`` of its
examples from the traces, and a held-out slice of them (the one head detection held out, same
seed) gets its own checks. ``--init-adapter`` starts from an adapter (a folder or a shipped name)
instead of fresh LoRA weights, so a shipped adapter can be trained further. The adapter folder
gets ``heads.json`` (the head set it was trained for, which the Compressor then scores with) and
``training.json`` (settings, the LoRA as saved, NQ line ids of the training and held-out questions,
loss history, checks).

    .venv/bin/python -m training.train_qr_lora --out /tmp/qr-lora            # CPU, embedded SmolLM2
    .venv/bin/python -m training.train_qr_lora --out /tmp/qr-lora --resume   # continue a run
    CCPROXY_SCORING_LORA_PATH=/tmp/qr-lora ...                               # serve with it
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ccproxy.compression.heads import ADAPTER_HEADS_FILE
from ccproxy.compression.qrhead import QRHeadScorer
from nqdata.items import Item, contains_answer
from training.data import UnitsItem
from training.detect_heads import dump_json

Head = tuple[int, int]
Example = Item | UnitsItem  # an NQ list (documents) or a list of any units (agent-trace tool results)
CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer.pt"
METADATA = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    steps: int = 200
    batch_size: int = 4  # examples per optimizer step (gradient accumulation)
    learning_rate: float = 5e-4
    warmup_steps: int = 10
    temperature: float = 0.05  # DEFAULT_TEMPERATURE[loss]
    loss: str = "raw"  # "raw": scores / temperature as they are; "zscore": per-list normalised first
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj")
    max_grad_norm: float = 1.0
    eval_every: int = 25
    checkpoint_every: int = 25
    seed: int = 0
    source: str | None = None  # None: the embedded SmolLM2; else a hub id, folder or .gguf
    dtype: str = "auto"  # auto: the scorer's own choice (bf16 on CUDA and on CPUs with native bf16)
    load_in_4bit: bool = False  # QLoRA (bitsandbytes NF4), CUDA only
    # QLoRA: True runs peft's prepare_model_for_kbit_training (embeddings and norms in float32), so
    # the residual stream and every saved activation is float32: 2.4x the peak memory on an H200
    # at 20 documents (docs/TRAINING.md), for numbers the bf16 Compressor never computes.
    upcast_4bit_base: bool = False
    heads: tuple[Head, ...] | None = None  # None: the base model's shipped set (or ``head_set``)
    head_set: str | None = None  # a shipped head set by name (heads and weights), e.g. smollm2-135m-instruct-hard
    max_minutes: float | None = None  # stop early (and save) past this wall time
    init_adapter: str | None = None  # start from this adapter (folder or shipped name), not fresh LoRA
    traces_per_batch: int = 0  # of each step's examples, how many come from the trace items
    resume: bool = False


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per optimizer step
    checks: list[dict[str, float]] = field(default_factory=list)  # held-out checks
    seconds: float = 0.0  # training wall time over all sessions


# --- the maths (pure functions) -----------------------------------------------------------------


# Raw calibrated scores are attention-mass differences (~0.01-1); z-scores run over a few units.
DEFAULT_TEMPERATURE = {"raw": 0.05, "zscore": 1.0}


def list_zscores(scores: torch.Tensor) -> torch.Tensor:
    """Scores of one list as z-scores (mean 0, unit std): a list whose heads put little mass on
    the context and one where they put much get the same scale. A flat list stays flat (0s)."""
    centred = scores - scores.mean()
    return centred / scores.std(unbiased=False).clamp(min=1e-6)


def listwise_loss(scores: torch.Tensor, positives: Sequence[int], temperature: float, normalise: bool) -> torch.Tensor:
    """Multi-positive softmax cross-entropy over one list: -log of the probability mass on the
    ``positives`` (logsumexp over them minus over all); with one positive, plain cross-entropy.
    Raw calibrated QR-head scores are attention-mass differences (~0.01-1): their temperature
    (~0.05) sets how hard the softmax pushes; z-scores take one near 1."""
    if not positives:
        raise ValueError("a list needs at least one positive unit")
    logits = (list_zscores(scores) if normalise else scores) / temperature
    index = torch.tensor(sorted(set(positives)), device=scores.device)
    return torch.logsumexp(logits, dim=0) - torch.logsumexp(logits[index], dim=0)


def answering_units(item: Example) -> list[int]:
    """The gold document and any other that holds one of the question's answers (SQuAD-normalised):
    each answers, so none should be pushed down. Hard distractors hold none by construction. A
    trace item has one positive: the one tool result that holds its needle."""
    if isinstance(item, UnitsItem):
        return [item.gold_index]
    return [i for i, passage in enumerate(item.documents)
            if i == item.gold_index or contains_answer(passage.text, item.record.answers)]


def item_loss(scores: torch.Tensor, item: Example, config: TrainConfig) -> torch.Tensor:
    return listwise_loss(scores, answering_units(item), config.temperature, normalise=config.loss == "zscore")


def learning_rate(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``base``: a pure function of the step, so
    a resumed run needs no scheduler state."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(step: int, batch_size: int, n_items: int, seed: int | str) -> list[int]:
    """The items of one optimizer step: consecutive slices of a seeded permutation per epoch.
    A function of the step alone, so resuming replays the same order."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_items)
        order = list(range(n_items))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        out.append(order[offset])
    return out


def step_examples(step: int, config: TrainConfig, items: Sequence[Item],
                  traces: Sequence[UnitsItem]) -> list[Example]:
    """One step's examples: ``batch_size - traces_per_batch`` NQ items, then ``traces_per_batch``
    trace items, each source in its own seeded order (so each is seen evenly whatever its size)."""
    n_traces = config.traces_per_batch if traces else 0
    nq = [items[i] for i in batch_indices(step, config.batch_size - n_traces, len(items), config.seed)]
    return nq + [traces[i] for i in batch_indices(step, n_traces, len(traces), f"traces-{config.seed}")]


def gold_rank(scores: Sequence[float], gold: int) -> int:
    """0 = first. Ties ranked as the policy breaks them (the later unit first)."""
    return sum(1 for j, s in enumerate(scores) if (s, j) > (scores[gold], gold))


# --- the model ----------------------------------------------------------------------------------


def resolve_dtype(name: str) -> torch.dtype | None:
    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


READ_AT_DEEPEST = ("q_proj", "k_proj")  # the deepest layer's projections the scorer reads


def lora_target_modules(targets: Sequence[str], deepest: int) -> list[str]:
    """Module name suffixes for peft: every ``targets`` projection of layers 0..deepest-1, and only
    the read ones (q, k) of the deepest layer. Layers above it never run."""
    names = [f"layers.{layer}.self_attn.{target}" for layer in range(deepest) for target in targets]
    return names + [f"layers.{deepest}.self_attn.{target}" for target in targets if target in READ_AT_DEEPEST]


def lora_config(config: TrainConfig, deepest: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=lora_target_modules(config.targets, deepest),
        bias="none",
    )


def configured_heads(config: TrainConfig, base_name: str) -> tuple[list[Head], list[float] | None]:
    """The heads to train (and their per-head weights): ``--heads`` (equal weights), else the
    named set, else the base model's shipped set, found as the Compressor finds them."""
    from ccproxy.compression.scoring import NoHeadSet, chosen_heads
    from ccproxy.settings import Settings

    if config.heads:
        return list(config.heads), None
    adapter = str(initial_adapter(config)) if config.init_adapter else None
    try:  # with --init-adapter and no set named: the set that adapter was trained for
        return chosen_heads(Settings(scoring_head_set=config.head_set), base_name, adapter)
    except NoHeadSet as error:
        raise SystemExit(f"{error} (here: --head-set, or --heads)") from None


def initial_adapter(config: TrainConfig) -> Path:
    from ccproxy.compression.adapters import resolve_adapter

    try:
        return resolve_adapter(config.init_adapter or "")
    except FileNotFoundError as error:
        raise SystemExit(f"--init-adapter: {error}") from None


def base_model_label(source: str | None) -> str | None:
    """What the adapter's config names as its base, where peft's own record would be a path in
    this machine's model cache (the embedded model, a GGUF file); None: keep peft's (a hub id or a
    folder given as ``--model``). ccproxy never reads it: it loads the base itself."""
    from ccproxy.compression.model import EMBEDDED, EMBEDDED_HUB_ID

    if source is None or source == EMBEDDED:
        return EMBEDDED_HUB_ID
    return Path(source).name if source.endswith(".gguf") else None


def build_scorer(config: TrainConfig) -> tuple[QRHeadScorer, str]:
    """A private copy of the base model with LoRA layers (fresh or from the checkpoint), scoring
    with the configured heads; and the base model's name."""
    from peft import PeftModel, get_peft_model

    from ccproxy.compression.model import load_base_for_training

    if config.load_in_4bit and not torch.cuda.is_available():
        raise SystemExit("--load-in-4bit needs a CUDA device (bitsandbytes NF4)")
    if config.load_in_4bit and (config.source is None or config.source.endswith(".gguf")):
        # The GGUF loader dequantises to bf16/float32 and ignores 4-bit: say so rather than train unquantised.
        raise SystemExit("--load-in-4bit needs a hub id or a local transformers folder, not a GGUF file")
    loaded = load_base_for_training(
        config.source, dtype=resolve_dtype(config.dtype), quantize_4bit=config.load_in_4bit
    )
    model = loaded.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.load_in_4bit and config.upcast_4bit_base:
        from peft import prepare_model_for_kbit_training

        # No gradient checkpointing: our own forward (window_token_scores) runs the layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    heads, weights = configured_heads(config, loaded.name)
    deepest = max(layer for layer, _ in heads)
    torch.manual_seed(config.seed)  # LoRA's A matrices start random
    checkpoint = config.out / CHECKPOINT
    if config.resume and (checkpoint / TRAINER_STATE).is_file():
        model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    elif config.init_adapter:  # its own targets and rank, whatever --targets/--rank say
        model = PeftModel.from_pretrained(model, str(initial_adapter(config)), is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(config, deepest))
    label = base_model_label(config.source)
    if label is not None:  # peft writes it into every adapter_config.json (adapter and checkpoints)
        model.peft_config["default"].base_model_name_or_path = label
    # Eval mode: no dropout anywhere (LoRA's is 0), the same numbers the Compressor computes.
    model.eval()
    return QRHeadScorer(model, loaded.tokenizer, heads, head_weights=weights), loaded.name


def trainable(scorer: QRHeadScorer) -> list[torch.nn.Parameter]:
    return [p for p in scorer.model.parameters() if p.requires_grad]


# --- checks -------------------------------------------------------------------------------------


def held_out_check(scorer: QRHeadScorer, items: Sequence[Example], config: TrainConfig) -> dict[str, float]:
    """Loss and gold ranks on held-out items through ``score`` (inference mode, windowed): the
    Compressor's path. At 20 documents a 10 % budget keeps ~2 documents, 20 % ~4."""
    losses, ranks = [], []
    for item in items:
        scores = scorer.score(item.question, item.document_texts())
        losses.append(float(item_loss(torch.tensor(scores), item, config)))
        ranks.append(gold_rank(scores, item.gold_index))
    n = max(1, len(items))
    return {
        "loss": sum(losses) / n,
        "top1": sum(r < 1 for r in ranks) / n,
        "top2": sum(r < 2 for r in ranks) / n,
        "top4": sum(r < 4 for r in ranks) / n,
        "mrr": sum(1 / (r + 1) for r in ranks) / n,
    }


# --- saving -------------------------------------------------------------------------------------


def save_checkpoint(scorer: QRHeadScorer, optimizer: torch.optim.Optimizer, state: TrainState, out: Path) -> None:
    """Adapter, optimizer and step, written beside and renamed over the last checkpoint, so an
    interrupted save never leaves a half checkpoint behind."""
    staging = out / f".{CHECKPOINT}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    scorer.model.save_pretrained(str(staging))
    torch.save({"optimizer": optimizer.state_dict(), "state": asdict(state)}, staging / TRAINER_STATE)
    final = out / CHECKPOINT
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)


def load_checkpoint(optimizer: torch.optim.Optimizer, out: Path) -> TrainState:
    saved = torch.load(out / CHECKPOINT / TRAINER_STATE, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(**saved["state"])


def head_set_origin(config: TrainConfig) -> str:
    if config.heads:
        return ""
    if config.head_set:
        return f" ({config.head_set})"
    return f" (that of {config.init_adapter}, which it started from)" if config.init_adapter else ""


def save_adapter(scorer: QRHeadScorer, base_name: str, config: TrainConfig, state: TrainState,
                 lines: dict[str, list[int]], data_note: str) -> None:
    """The adapter (peft ``save_pretrained``), the head set it serves with, and the metadata."""
    out = config.out
    scorer.model.save_pretrained(str(out))
    heads: dict[str, Any] = {
        "model": base_name,
        "heads": [list(h) for h in scorer.heads],
        "source": "training/train_qr_lora.py: the head set this adapter was trained for" + head_set_origin(config),
    }
    if scorer.head_weights is not None:
        heads["weights"] = [round(float(w), 6) for w in scorer.head_weights]  # scorer.heads' order
    (out / ADAPTER_HEADS_FILE).write_text(dump_json(heads), encoding="utf-8")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    # What the LoRA is, as peft saved it: with --init-adapter, that adapter's, not --targets/--rank.
    peft_config = scorer.model.peft_config["default"]
    settings["lora"] = {"r": peft_config.r, "alpha": peft_config.lora_alpha,
                        "target_modules": sorted(peft_config.target_modules)}
    (out / METADATA).write_text(json.dumps({
        "config": settings,
        "data": data_note,
        "nq_lines": lines,
        "steps_done": state.step,
        "train_seconds": round(state.seconds, 1),
        "checks": state.checks,
        "history": state.history,
    }, indent=1) + "\n", encoding="utf-8")


# --- the loop -----------------------------------------------------------------------------------


def progress_bar(total: int, initial: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", file=sys.stderr, dynamic_ncols=True)


def say(bar: Any, message: str) -> None:
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def optimizer_step(scorer: QRHeadScorer, optimizer: torch.optim.Optimizer, batch: Sequence[Example], lr: float,
                   config: TrainConfig) -> tuple[float, float]:
    """One update from the mean loss over ``batch``, one example at a time (gradient accumulation:
    memory holds one example's activations). Returns (mean loss before the update, gradient norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = []
    for item in batch:
        scores = scorer.differentiable_unit_scores(item.question, item.document_texts())
        loss = item_loss(scores, item, config)
        (loss / len(batch)).backward()
        losses.append(float(loss.detach()))
    norm = torch.nn.utils.clip_grad_norm_(trainable(scorer), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(losses), float(norm)


def train(config: TrainConfig, items: Sequence[Item], held_out: Sequence[Item],
          lines: dict[str, list[int]] | None = None, data_note: str = "",
          traces: Sequence[UnitsItem] = (), trace_held_out: Sequence[UnitsItem] = ()) -> TrainState:
    """Train, check and save; returns the final state (its ``history`` holds every step's loss).
    ``traces``: trace items mixed into every step (``config.traces_per_batch``); ``trace_held_out``
    gets its own checks, as ``traces_<measure>``."""
    if traces and not 0 < config.traces_per_batch < config.batch_size:
        raise ValueError(f"traces_per_batch must be 1..{config.batch_size - 1} with trace items, got {config.traces_per_batch}")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    scorer, base_name = build_scorer(config)
    optimizer = torch.optim.AdamW(trainable(scorer), lr=config.learning_rate, weight_decay=0.0)
    resuming = config.resume and (config.out / CHECKPOINT / TRAINER_STATE).is_file()
    state = load_checkpoint(optimizer, config.out) if resuming else TrainState()
    lines = lines or {"train": sorted(i.record.line for i in items),
                      "held_out": sorted(i.record.line for i in held_out)}

    def check(step: int) -> None:
        row = {"step": step, **held_out_check(scorer, held_out, config)}
        if trace_held_out:
            row |= {f"traces_{k}": v for k, v in held_out_check(scorer, trace_held_out, config).items()}
        state.checks.append(row)
        say(bar, f"check step {step}: {row}")

    bar = progress_bar(config.steps, state.step)
    if held_out and not state.checks:
        check(0)
    started = time.perf_counter()
    seconds_before = state.seconds
    while state.step < config.steps:
        lr = learning_rate(state.step, config.steps, config.learning_rate, config.warmup_steps)
        batch = step_examples(state.step, config, items, traces)
        mean, norm = optimizer_step(scorer, optimizer, batch, lr, config)
        state.step += 1
        state.seconds = seconds_before + time.perf_counter() - started
        state.history.append({"step": state.step, "loss": round(mean, 5), "lr": lr, "grad_norm": round(float(norm), 4)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.3f}")
        out_of_time = config.max_minutes is not None and state.seconds > 60 * config.max_minutes
        if held_out and (state.step % config.eval_every == 0 or state.step == config.steps or out_of_time):
            check(state.step)
        if state.step % config.checkpoint_every == 0 or state.step == config.steps or out_of_time:
            save_checkpoint(scorer, optimizer, state, config.out)
        if out_of_time:
            say(bar, f"stopping at step {state.step}: past --max-minutes {config.max_minutes}")
            break
    if bar is not None:
        bar.close()
    # The questions the steps actually drew (a short run sees part of the training list).
    drawn = [e for step in range(state.step) for e in step_examples(step, config, items, traces)]
    lines = {**lines, "train_seen": sorted({e.record.line for e in drawn if isinstance(e, Item)})}
    save_adapter(scorer, base_name, config, state, lines, data_note)
    return state


# --- entry point --------------------------------------------------------------------------------


def parse_heads(text: str) -> tuple[Head, ...]:
    """``"7:7,14:3"`` -> ((7, 7), (14, 3))."""
    return tuple((int(layer), int(head)) for layer, head in (pair.split(":") for pair in text.split(",") if pair))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig(out=Path("."))
    parser.add_argument("--out", type=Path, required=True, help="the adapter folder (checkpoints inside)")
    parser.add_argument("--model", default=None, help="hub id, local folder or .gguf; default: the embedded SmolLM2")
    parser.add_argument("--heads", type=parse_heads, default=None, help="layer:head,...; default: the model's set")
    parser.add_argument("--head-set", default=None,
                        help="a shipped head set by name, with its weights (e.g. smollm2-135m-instruct-hard)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--loss", choices=sorted(DEFAULT_TEMPERATURE), default=defaults.loss,
                        help="raw: the scores as they are; zscore: normalised per list before the softmax")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"softmax temperature (default: {DEFAULT_TEMPERATURE} by --loss)")
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=int, default=defaults.alpha)
    parser.add_argument("--targets", nargs="+", default=list(defaults.targets),
                        help="projections to adapt (q_proj k_proj; v_proj o_proj also matter below the deepest layer)")
    parser.add_argument("--documents", type=int, default=8, help="documents per training example (one gold)")
    parser.add_argument("--distractors", choices=["hard", "random"], default="hard")
    parser.add_argument("--n-train", type=int, default=None, help="training questions (default: all not held out)")
    parser.add_argument("--n-held-out", type=int, default=24, help="training-part questions kept for the checks")
    parser.add_argument("--held-out-documents", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=defaults.dtype)
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base through bitsandbytes (CUDA only)")
    parser.add_argument("--upcast-4bit-base", action="store_true",
                        help="QLoRA: embeddings and norms in float32 (peft's prepare_model_for_kbit_training)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) past this training time")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    parser.add_argument("--init-adapter", default=None, metavar="ADAPTER",
                        help="start from this adapter (a folder or a shipped name, e.g. smollm2-hard-lora) "
                             "instead of fresh LoRA weights: its head set unless --head-set/--heads, its "
                             "rank and targets whatever --rank/--alpha/--targets say")
    parser.add_argument("--trace-items", type=Path, default=None, metavar="FILE",
                        help="trace items (python -m bench.trace_items --out FILE) mixed into every step")
    parser.add_argument("--traces-per-batch", type=int, default=2, help="of each step's examples, from the traces")
    parser.add_argument("--traces-held-out", type=int, default=40,
                        help="trace items held out for the checks (the same draw as fit_head_weights with the same --seed)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from training.data import build_training_data, read_units_items, split_items

    config = replace(
        defaults, out=args.out, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=args.warmup_steps, loss=args.loss,
        temperature=DEFAULT_TEMPERATURE[args.loss] if args.temperature is None else args.temperature,
        rank=args.rank, alpha=args.alpha,
        targets=tuple(args.targets), eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        seed=args.seed, source=args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
        upcast_4bit_base=args.upcast_4bit_base, heads=args.heads, head_set=args.head_set,
        max_minutes=args.max_minutes, resume=args.resume, init_adapter=args.init_adapter,
        traces_per_batch=args.traces_per_batch if args.trace_items else 0,
    )
    data = build_training_data(
        args.documents, held_out_documents=args.held_out_documents, n_held_out=args.n_held_out,
        n_train=args.n_train, distractors=args.distractors, seed=args.seed,
    )
    note = (
        f"nqdata.items TRAINING part (NQ-open oracle dev lines 0-499) only: {len(data.train)} training questions x "
        f"{args.documents} documents ({args.distractors} distractors from the other training questions' "
        f"passages), {len(data.held_out)} held-out questions x {args.held_out_documents} documents "
        f"({args.distractors} distractors from the whole training part), seed {args.seed}"
    )
    traces: list[UnitsItem] = []
    trace_held_out: list[UnitsItem] = []
    if args.trace_items:
        file_bytes = args.trace_items.read_bytes()
        source, trace_items = read_units_items(file_bytes.decode("utf-8"))
        traces, trace_held_out = split_items(trace_items, args.traces_held_out, args.seed)
        if not traces:
            parser.error(f"--traces-held-out {args.traces_held_out} leaves none of the {len(trace_items)} trace items to train on")
        note += (f"; plus {source} (file sha256 {hashlib.sha256(file_bytes).hexdigest()[:16]}): {len(traces)} to train, "
                 f"{len(trace_held_out)} held out (seed {args.seed}), {config.traces_per_batch} of each step's "
                 f"{config.batch_size} examples")
    if args.init_adapter:
        note += f"; LoRA started from the adapter {args.init_adapter}"
    print(note, file=sys.stderr, flush=True)
    state = train(config, data.train, data.held_out, data.lines(), note, traces, trace_held_out)
    first, last = state.history[:10], state.history[-10:]
    print(json.dumps({
        "out": str(args.out), "steps": state.step, "train_minutes": round(state.seconds / 60, 1),
        "loss_first_10": round(sum(r["loss"] for r in first) / max(1, len(first)), 4),
        "loss_last_10": round(sum(r["loss"] for r in last) / max(1, len(last)), 4),
        "checks": state.checks,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
