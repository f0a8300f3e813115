"""Training data for the QR-head LoRA, from the TRAINING part of the NQ file only.

``nqdata/items.py`` fixes the split: lines 0-499 of ``nq_open_oracle_dev.jsonl.gz`` are the training
part, lines 500-999 the evaluation part that every reported benchmark figure uses. Here the
training part is split once more, by a seeded draw:

* ``held_out``: a few questions kept for the periodic checks during training. Their items are
  built like the benchmark's (20 documents, hard distractors by default) over the whole training
  part.
* ``train``: the other questions. Their distractors come from the other training questions'
  passages only, so no held-out gold passage is ever seen in training, not even as a distractor.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from nqdata.items import SPLIT_LINES, Item, Record, hard_distractor_items, load_records, random_distractor_items

Distractors = Literal["hard", "random"]
BUILDERS: dict[str, Callable[..., list[Item]]] = {"hard": hard_distractor_items, "random": random_distractor_items}


@dataclass(frozen=True)
class TrainingData:
    train: list[Item]
    held_out: list[Item]

    def lines(self) -> dict[str, list[int]]:
        """NQ file line numbers (0-based) of the questions in each part, for the adapter's metadata."""
        return {
            "train": sorted(item.record.line for item in self.train),
            "held_out": sorted(item.record.line for item in self.held_out),
        }


T = TypeVar("T")


def split_items(items: Sequence[T], n_held_out: int, seed: int) -> tuple[list[T], list[T]]:
    """(fit, held_out): a seeded shuffle's first ``n_held_out`` items are held out, both lists in
    the given order. Head detection splits its scored items (hard distractors, agent traces) this
    way, and the LoRA its trace items (``read_units_items``): with the same seed the LoRA never
    trains on the traces detection held out."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held_out])
    return [s for i, s in enumerate(items) if i not in held], [s for i, s in enumerate(items) if i in held]


def split_held_out(records: Sequence[Record], n_held_out: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held_out): a seeded draw of ``n_held_out`` records, both lists in file order."""
    outside = [r.line for r in records if r.line not in SPLIT_LINES["train"]]
    if outside:
        raise ValueError(f"lines {outside[:5]} are not in the training part")
    held = set(random.Random(f"held-out-{seed}").sample([r.line for r in records], n_held_out))
    return [r for r in records if r.line not in held], [r for r in records if r.line in held]


def build_training_data(
    n_documents: int,
    *,
    held_out_documents: int = 20,
    n_held_out: int = 24,
    n_train: int | None = None,
    distractors: Distractors = "hard",
    seed: int = 0,
) -> TrainingData:
    """Items of ``n_documents`` (one gold) for training and of ``held_out_documents`` for the checks."""
    records = load_records("train")
    train_records, held_records = split_held_out(records, n_held_out, seed)
    build = BUILDERS[distractors]
    train = build(train_records, n_documents, n_items=n_train, seed=seed)
    held_lines = {r.line for r in held_records}
    # The builders draw distractors from the records they are given: the whole training part here.
    held_out = [item for item in build(records, held_out_documents, seed=seed) if item.record.line in held_lines]
    return TrainingData(train, held_out)


@dataclass(frozen=True)
class UnitsItem:
    """A retrieval item of any units (tool results, turns), read from a JSON file written outside
    ``training`` (``bench/trace_items.py``): what ``detect_heads.score_items`` reads of an item."""

    question: str
    units: tuple[str, ...]
    gold_index: int
    kind: str

    def document_texts(self) -> list[str]:
        return list(self.units)


def read_units_items(text: str) -> tuple[str, list[UnitsItem]]:
    """(the file's description of its items, the items) from ``{"source": ..., "items": [{"question",
    "units", "gold", "kind"}, ...]}``; an item whose gold is not one of its units is refused."""
    data = json.loads(text)
    items = []
    for number, raw in enumerate(data["items"]):
        units = tuple(str(unit) for unit in raw["units"])
        gold = int(raw["gold"])
        if not 0 <= gold < len(units):
            raise ValueError(f"item {number}: gold {gold} is not one of its {len(units)} units")
        items.append(UnitsItem(str(raw["question"]), units, gold, str(raw.get("kind", ""))))
    return str(data.get("source", "")), items
