"""QLoRA training of the QR heads on a GPU at Mistral-7B-Instruct-v0.2's shapes: time and memory.

Checks docs/TRAINING.md's estimates ("Expected memory and time") with the real training step
(``training.train_qr_lora.optimizer_step``) on the random-weight checkpoint of ``bench/gpu_check.py``
(real shapes, NF4 through the production loader). Items are NQ TRAINING-part questions with random
distractors: hard ones need BM25 and MiniLM, and a step's cost depends only on the lengths.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_check import build_random_checkpoint
from training.data import build_training_data
from training.train_qr_lora import TrainConfig, build_scorer, held_out_check, optimizer_step, trainable

# Four layers up to 20: LoRA then adapts layers 0-20, the 21 layers TRAINING.md's estimate assumes.
DEFAULT_HEADS = tuple((layer, head) for layer in (8, 12, 16, 20) for head in (0, 7, 15, 23))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu/tokenizer"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mistral-7b-random"))
    parser.add_argument("--documents", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per size, after one warm-up")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--upcast", type=lambda v: v == "float32", nargs="+", default=[True, False],
                        metavar="{float32,bf16}", help="the base's embeddings and norms during QLoRA")
    args = parser.parse_args()

    started = time.perf_counter()
    if not (args.workdir / "config.json").exists():
        build_random_checkpoint(args.workdir, args.tokenizer)
    print(f"random checkpoint ready in {time.perf_counter() - started:.0f}s", flush=True)

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | heads {len(DEFAULT_HEADS)}, "
          f"deepest layer {max(layer for layer, _ in DEFAULT_HEADS)}")
    print("| base params (embeddings, norms) | documents | tokens per example (mean) | s per example "
          f"| s per step of {args.batch_size} | peak GiB | 20-doc check s per item |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for upcast in args.upcast:
        config = TrainConfig(out=Path(tempfile.mkdtemp()), source=str(args.workdir), load_in_4bit=True,
                             heads=DEFAULT_HEADS, batch_size=args.batch_size, upcast_4bit_base=upcast)
        measure(config, args.documents, args.steps)


def measure(config: TrainConfig, documents: list[int], n_steps: int) -> None:
    """One table row per item size: a fresh NF4 base with LoRA, one warm-up step, then ``n_steps`` timed."""
    torch.cuda.empty_cache()
    scorer, _ = build_scorer(config)
    optimizer = torch.optim.AdamW(trainable(scorer), lr=config.learning_rate)
    label = "float32 (peft's prepare_model_for_kbit_training)" if config.upcast_4bit_base else "bf16 (as served)"
    for n_documents in documents:
        data = build_training_data(n_documents, n_held_out=2, n_train=(n_steps + 1) * config.batch_size,
                                   distractors="random")
        batches = [data.train[i:i + config.batch_size] for i in range(0, len(data.train), config.batch_size)]
        tokens = statistics.mean(
            len(scorer.tokenizer(item.question + " " + " ".join(item.document_texts()))["input_ids"])
            for item in data.train
        )
        optimizer_step(scorer, optimizer, batches[0], config.learning_rate, config)  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_seconds = []
        for batch in batches[1:n_steps + 1]:
            started = time.perf_counter()
            optimizer_step(scorer, optimizer, batch, config.learning_rate, config)
            torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() / 2**30
        started = time.perf_counter()
        held_out_check(scorer, data.held_out, config)  # the Compressor's inference path, LoRA on
        check_seconds = (time.perf_counter() - started) / max(1, len(data.held_out))
        step = statistics.median(step_seconds)
        print(f"| {label} | {n_documents} | {tokens:,.0f} | {step / config.batch_size:.2f} | {step:.2f} "
              f"| {peak:.1f} | {check_seconds:.2f} |", flush=True)
    del scorer, optimizer


if __name__ == "__main__":
    main()
