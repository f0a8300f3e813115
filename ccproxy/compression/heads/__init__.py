"""Detected QR-head sets, one JSON file per model (written by ``training/detect_heads.py``).

File format: ``{"model": ..., "heads": [[layer, head], ...], "source": ..., "detected_on": ...}``
plus whatever report the detector adds. The file name is the model's name as
``ccproxy.compression.model.model_name`` spells it, e.g. ``smollm2-135m-instruct.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEADS_DIR = Path(__file__).resolve().parent


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
    if data is None:
        return None
    return [(int(layer), int(head)) for layer, head in data["heads"]]
