"""QR-head scoring speed on a GPU at Mistral-7B-Instruct-v0.2's shapes, loaded in int4 (NF4).

No hub here: the weights are random, the shapes real (32 layers, 32 query / 8 KV heads, 4096
wide), saved once and loaded back through the production path (``load_scoring_model`` with
bitsandbytes NF4). Speed does not depend on the weights' values. The vocabulary is the
tokenizer's (SmolLM2's, carried along), which changes only the embedding table's size.

``--batches 1 8 32`` (``bash bench/gpu_check.sh load``): requests/s of the batched scorer for that
many 1 k-token requests in one ``score_batch`` call (windows in padded forwards up to
MAX_BATCH_TOKENS_CUDA), against the same requests one at a time, same run (issue 18).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch


def build_random_checkpoint(folder: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    del model
    torch.cuda.empty_cache()


def units_of(total_tokens: int, tokenizer, rng: random.Random) -> list[str]:
    words = "river law court season film album band king war city team song game party".split()
    units, used = [], 0
    while used < total_tokens:
        text = " ".join(rng.choice(words) for _ in range(90))
        used += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        units.append(text)
    return units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu/tokenizer"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mistral-7b-random"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[1000, 8000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="*", default=[], help="batch sizes at 1 k tokens (load mode)")
    args = parser.parse_args()

    from ccproxy.compression.model import load_scoring_model
    from ccproxy.compression.qrhead import QRHeadScorer

    started = time.perf_counter()
    if not (args.workdir / "config.json").exists():
        build_random_checkpoint(args.workdir, args.tokenizer)
    print(f"random checkpoint ready in {time.perf_counter() - started:.0f}s", flush=True)
    started = time.perf_counter()
    loaded = load_scoring_model(str(args.workdir), device="cuda", quantize_4bit=True)
    print(f"int4 load in {time.perf_counter() - started:.0f}s; "
          f"GPU memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)

    head_sets = {
        "ICR middle layers (all heads)": None,
        "16 heads, layers <= 15": [(layer, head) for layer in (12, 13, 14, 15) for head in (0, 7, 15, 23)],
    }
    rng = random.Random(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    if args.batches:
        batched_throughput(loaded, head_sets["16 heads, layers <= 15"], args.batches, rng)
        return
    print("| head set | context tokens | ms per request | context tokens/s | peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, heads in head_sets.items():
        scorer = QRHeadScorer(loaded.model, loaded.tokenizer, heads, window_tokens=32768)
        for n_tokens in args.contexts:
            units = units_of(n_tokens, loaded.tokenizer, rng)
            query = "which season did the band release the album"
            scorer.score(query, units)  # warm-up: kernels, allocator
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for _ in range(args.repeats):
                scorer.score(query, units)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / args.repeats
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"| {label} | {n_tokens} | {seconds * 1000:.0f} | {n_tokens / seconds:,.0f} | {peak:.1f} |", flush=True)


def batched_throughput(loaded, heads, sizes: list[int], rng: random.Random) -> None:
    from ccproxy.compression.qrhead import QRHeadScorer

    scorer = QRHeadScorer(loaded.model, loaded.tokenizer, heads)  # CUDA: padded batches by default
    query = "which season did the band release the album"
    print(f"| requests | one at a time s (req/s) | batched s (req/s) | batched / one at a time | peak GiB |  (max_batch_tokens {scorer.max_batch_tokens})")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size in sizes:
        requests = [(query, units_of(1000, loaded.tokenizer, rng)) for _ in range(size)]
        scorer.score_batch(requests[:2])  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for request in requests:
            scorer.score_batch([request])
        torch.cuda.synchronize()
        alone = time.perf_counter() - started
        started = time.perf_counter()
        scorer.score_batch(requests)
        torch.cuda.synchronize()
        batched = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"| {size} | {alone:.2f} ({size / alone:.1f}) | {batched:.2f} ({size / batched:.1f}) | "
              f"{batched / alone:.2f} | {peak:.1f} |", flush=True)


if __name__ == "__main__":
    main()
