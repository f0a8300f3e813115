"""Multi-document QA items from the NaturalQuestions dev file in ``data/nq/``.

The split is fixed and written down here, for benchmarks and training alike:
lines 0–499 of ``nq_open_oracle_dev.jsonl.gz`` are the TRAINING part (head detection, LoRA),
lines 500–999 the EVALUATION part (every reported benchmark figure). Distractors for an item
are drawn from the passages of the same part only, so no evaluation passage is ever trained on.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "nq" / "nq_open_oracle_dev.jsonl.gz"
Split = Literal["train", "eval"]
SPLIT_LINES: dict[str, range] = {"train": range(0, 500), "eval": range(500, 1000)}


@dataclass(frozen=True)
class Passage:
    title: str
    text: str

    def render(self, number: int) -> str:
        return f"Document [{number}] (Title: {self.title}) {self.text}"


@dataclass(frozen=True)
class Record:
    line: int
    question: str
    answers: tuple[str, ...]
    gold: Passage


@dataclass(frozen=True)
class Item:
    """One question over several documents, exactly one of which (``gold_index``) is gold."""

    record: Record
    documents: tuple[Passage, ...]
    gold_index: int

    @property
    def question(self) -> str:
        return self.record.question

    def document_texts(self) -> list[str]:
        return [passage.render(i + 1) for i, passage in enumerate(self.documents)]

    def messages(self) -> list[dict[str, str]]:
        """The chat request a RAG application would send: documents, then the question last."""
        context = "\n\n".join(self.document_texts())
        instruction = (
            "Write a high-quality answer for the given question using only the provided search "
            "results (some of which might be irrelevant)."
        )
        return [
            {
                "role": "user",
                "content": f"{instruction}\n\n{context}\n\nQuestion: {self.question}\nAnswer:",
            }
        ]


def load_records(split: Split, path: Path = DATA_FILE) -> list[Record]:
    lines = SPLIT_LINES[split]
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if number in lines:
                raw = json.loads(line)
                gold = Passage(raw["gold"]["title"], raw["gold"]["text"])
                records.append(Record(number, raw["question"], tuple(raw["answers"]), gold))
    return records


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_NO_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains_answer(text: str, answers: tuple[str, ...]) -> bool:
    haystack = normalize_answer(text)
    needles = [normalize_answer(answer) for answer in answers]
    return any(needle and needle in haystack for needle in needles)


def random_distractor_items(
    records: list[Record], n_documents: int, *, n_items: int | None = None, seed: int = 0
) -> list[Item]:
    """Gold passage + random passages of other questions (none containing an answer)."""
    rng = random.Random(seed)
    chosen = records if n_items is None else rng.sample(records, min(n_items, len(records)))
    items = []
    for record in chosen:
        pool = [
            other.gold
            for other in records
            if other.line != record.line and not contains_answer(other.gold.text, record.answers)
        ]
        distractors = rng.sample(pool, n_documents - 1)
        gold_index = rng.randrange(n_documents)
        documents = distractors[:gold_index] + [record.gold] + distractors[gold_index:]
        items.append(Item(record, tuple(documents), gold_index))
    return items


_POOL_VECTORS: dict[tuple[str, ...], Any] = {}


def _interleave_unique(rankings: list[list[int]], skip: set[int], limit: int) -> list[int]:
    """Take from each ranking in turn, skipping what is already taken or excluded."""
    taken: list[int] = []
    seen = set(skip)
    cursors = [0] * len(rankings)
    while len(taken) < limit and any(c < len(r) for c, r in zip(cursors, rankings)):
        for k, ranking in enumerate(rankings):
            while cursors[k] < len(ranking) and ranking[cursors[k]] in seen:
                cursors[k] += 1
            if cursors[k] < len(ranking) and len(taken) < limit:
                seen.add(ranking[cursors[k]])
                taken.append(ranking[cursors[k]])
    return taken


def hard_distractor_items(
    records: list[Record], n_documents: int, *, n_items: int | None = None, seed: int = 0
) -> list[Item]:
    """Gold passage + the passages of the same part most similar to the question.

    Distractors are mined from the other records' gold passages, alternately from the BM25
    ranking and from the all-MiniLM-L6-v2 cosine ranking (so about half lexical, half dense,
    deduplicated). A passage whose title or text holds an answer string is never a distractor:
    it would be a second gold. The questions drawn match ``random_distractor_items`` for the
    same ``seed`` and ``n_items``, so both kinds of distractors ask the same questions.
    """
    import numpy as np

    from nqdata.retrievers import BM25, minilm

    rng = random.Random(seed)
    chosen = records if n_items is None else rng.sample(records, min(n_items, len(records)))
    pool = [record.gold for record in records]
    pool_texts = [f"{passage.title} {passage.text}" for passage in pool]
    lexical_index = BM25(pool_texts)
    encoder = minilm()
    key = tuple(pool_texts)
    if key not in _POOL_VECTORS:  # encoding the pool is most of the cost; sizes share it
        _POOL_VECTORS[key] = encoder.encode(pool_texts)
    pool_vectors = _POOL_VECTORS[key]
    question_vectors = encoder.encode([record.question for record in chosen])
    items = []
    for record, question_vector in zip(chosen, question_vectors):
        excluded = {
            j
            for j, passage in enumerate(pool)
            if passage.text == record.gold.text
            or contains_answer(f"{passage.title} {passage.text}", record.answers)
        }
        lexical = np.argsort(-lexical_index.scores(record.question), kind="stable").tolist()
        dense = np.argsort(-(pool_vectors @ question_vector), kind="stable").tolist()
        picked = _interleave_unique([lexical, dense], excluded, n_documents - 1)
        if len(picked) < n_documents - 1:
            raise ValueError(f"only {len(picked)} distractors for line {record.line}")
        distractors = [pool[j] for j in picked]
        # Rank order must not leak into position: shuffle, then place the gold at random.
        rng.shuffle(distractors)
        gold_index = rng.randrange(n_documents)
        documents = distractors[:gold_index] + [record.gold] + distractors[gold_index:]
        items.append(Item(record, tuple(documents), gold_index))
    return items
