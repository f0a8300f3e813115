"""The request bodies of the load scenarios, with no locust import (locust monkey-patches the
process it is imported in), so ``bench/load.py`` can build and count the very same requests.

- short chat: a system prompt and one NaturalQuestions question (~30 tokens);
- RAG: NQ passages from the evaluation part (``nqdata/items.py``), the question last, the shape of
  ``nqdata.items.Item.messages()``, trimmed to a target size in the o200k tokens ccproxy counts for
  OpenAI models (whole prompt, chat framing included).
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import lru_cache
from typing import Any

from nqdata.items import Item, load_records, random_distractor_items

SYSTEM_PROMPT = "You are a helpful assistant. Answer in one short sentence."
MAX_TOKENS = 16


@lru_cache(maxsize=1)
def questions() -> tuple[str, ...]:
    return tuple(record.question for record in load_records("eval"))


def count_tokens(text: str) -> int:
    from ccproxy.tokens import tiktoken_encoding

    return len(tiktoken_encoding("o200k_base").encode_ordinary(text))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A chat prompt's tokens the OpenAI cookbook's way (as ccproxy counts gpt-4o-era models)."""
    return 3 + sum(3 + count_tokens(m["role"]) + count_tokens(str(m["content"])) for m in messages)


def _trimmed(item: Item, target_tokens: int) -> Item:
    """Drops distractors from the end (never the gold passage) until the prompt fits."""
    documents = list(item.documents)
    gold = item.documents[item.gold_index]
    while len(documents) > 1:
        candidate = replace(item, documents=tuple(documents), gold_index=documents.index(gold))
        excess = prompt_tokens(candidate.messages()) - target_tokens
        if excess <= 0:
            return candidate
        for _ in range(max(1, excess // 400)):  # passages are ~130 tokens: cut runs when far off
            if len(documents) <= 1:
                break
            documents.pop(len(documents) - 1 if documents[-1] is not gold else len(documents) - 2)
    return replace(item, documents=tuple(documents), gold_index=0)


@lru_cache(maxsize=None)
def rag_items(target_tokens: int, n_items: int) -> tuple[Item, ...]:
    """``n_items`` RAG prompts of 92–100 % of ``target_tokens`` tokens, the same on every run."""
    records = load_records("eval")
    n_documents = min(len(records) - 1, target_tokens // 100 + 4)  # more than enough, then trim
    candidates = random_distractor_items(records, n_documents, n_items=3 * n_items, seed=7)
    fitting = []
    for item in candidates:
        trimmed = _trimmed(item, target_tokens)
        if prompt_tokens(trimmed.messages()) >= 0.92 * target_tokens:
            fitting.append(trimmed)
        if len(fitting) == n_items:
            break
    return tuple(fitting)


def short_chat_body(model: str, rng: random.Random, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": rng.choice(questions()).capitalize() + "?"},
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def rag_body(model: str, item: Item) -> dict[str, Any]:
    return {"model": model, "messages": item.messages(), "max_tokens": MAX_TOKENS, "temperature": 0}


def headers(api_key: str = "", upstream_key: str = "", compression: str = "on", stream: bool = False) -> dict[str, str]:
    sent = {"Content-Type": "application/json"}
    if api_key:
        sent["X-API-Key"] = api_key
    if upstream_key:
        sent["Authorization"] = f"Bearer {upstream_key}"
    if compression == "off":
        sent["X-Compression"] = "off"
    if stream:
        sent["Accept"] = "text/event-stream"
        sent["Accept-Encoding"] = "identity"
    return sent
