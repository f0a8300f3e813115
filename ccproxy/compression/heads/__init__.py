"""Detected QR-head sets, one JSON file per model (written by ``training/detect_heads.py``).

File format: ``{"model": ..., "heads": [[layer, head], ...], "source": ..., "detected_on": ...}``,
optionally ``"weights": [w, ...]`` (one non-negative weight per head, in the order of ``heads``;
``training/fit_head_weights.py``), plus whatever report the detector adds. The file name is the model's name as
``ccproxy.compression.model.model_name`` spells it, e.g. ``smollm2-135m-instruct.json``.

A LoRA adapter (``training/train_qr_lora.py``) carries the set it was trained for as
``heads.json`` in its own folder: training moves exactly those heads, so they are the ones to read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEADS_DIR = Path(__file__).resolve().parent
ADAPTER_HEADS_FILE = "heads.json"


def head_set_path(model_name: str) -> Path:
    return HEADS_DIR / f"{model_name.lower().replace('/', '--')}.json"


def read_head_set(model_name: str) -> dict[str, Any] | None:
    """The whole file (heads and report), or None when no set was detected for this model."""
    path = head_set_path(model_name)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def load_head_set(model_name: str) -> list[tuple[int, int]] | None:
    """The detected (layer, head) pairs for ``model_name``; None means: use the scorer's default."""
    data = read_head_set(model_name)
    return None if data is None else head_pairs(data)


def head_pairs(data: dict[str, Any]) -> list[tuple[int, int]]:
    return [(int(layer), int(head)) for layer, head in data["heads"]]


def head_weights(data: dict[str, Any] | None) -> list[float] | None:
    """A head set file's per-head weights, in the order of its heads; None: every head counts 1."""
    if data is None or data.get("weights") is None:
        return None
    weights = [float(w) for w in data["weights"]]
    if len(weights) != len(data["heads"]):
        raise ValueError(f"{len(weights)} weights for {len(data['heads'])} heads in the head set of {data.get('model')!r}")
    return weights


def adapter_head_set_path(adapter: str | Path) -> Path:
    return Path(adapter) / ADAPTER_HEADS_FILE


def scoring_head_file(model_name: str, adapter: str | Path | None = None) -> dict[str, Any] | None:
    """The head set file a loaded model scores with. With an adapter: the adapter's own
    ``heads.json``, else a set shipped under the adapted model's name (``<base>+<adapter>``), else
    the base model's set, since the adapter was most likely trained on it. None: no set."""
    if adapter is not None:
        path = adapter_head_set_path(adapter)
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        return read_head_set(model_name) or read_head_set(model_name.split("+", 1)[0])
    return read_head_set(model_name)


def scoring_head_set(model_name: str, adapter: str | Path | None = None) -> list[tuple[int, int]] | None:
    """The heads of ``scoring_head_file``; None: the scorer's default."""
    data = scoring_head_file(model_name, adapter)
    return None if data is None else head_pairs(data)
