"""QR-head LoRA adapters that ship with ccproxy, one folder each (``training/train_qr_lora.py``'s
output: peft's ``adapter_config.json`` and ``adapter_model.safetensors``, the ``heads.json`` it was
trained for, ``training.json``). ``CCPROXY_SCORING_LORA_PATH`` takes a folder anywhere or the name of
one of these; docs/TRAINING.md says how each was trained and what it measured.
"""

from __future__ import annotations

from pathlib import Path

ADAPTERS_DIR = Path(__file__).resolve().parent
ADAPTER_CONFIG = "adapter_config.json"


def shipped_adapters() -> list[str]:
    return sorted(p.name for p in ADAPTERS_DIR.iterdir() if (p / ADAPTER_CONFIG).is_file())


def resolve_adapter(value: str | Path) -> Path:
    """A LoRA adapter folder: ``value`` itself when it holds an adapter, else the shipped adapter of
    that name. Anything else is an error that names both readings."""
    path = Path(value)
    if (path / ADAPTER_CONFIG).is_file():
        return path
    name, shipped = str(value), shipped_adapters()
    if name in shipped:  # exact names only: never a path assembled from the value
        return ADAPTERS_DIR / name
    raise FileNotFoundError(
        f"CCPROXY_SCORING_LORA_PATH={name!r} is neither a folder with {ADAPTER_CONFIG} nor a shipped "
        f"adapter ({', '.join(shipped) or 'none ship'})"
    )
