"""Token counting for compression budgets and the x-tokens-* headers.

Today one tokenizer counts everything: the embedded SmolLM2's. Counting per upstream model
family (tiktoken for OpenAI models, the HF tokenizer and chat template for open models) is
the accounting issue's work and replaces ``default_counter``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Protocol


class TokenCounter(Protocol):
    def __call__(self, texts: Sequence[str]) -> list[int]: ...


class TokenizerCounter:
    """Counts with a Hugging Face tokenizer, without special tokens (the chat template adds them)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __call__(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encoded = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]


@lru_cache(maxsize=1)
def default_counter() -> TokenizerCounter:
    from transformers import AutoTokenizer

    from ccproxy.embedded import embedded_gguf_path

    gguf = embedded_gguf_path()
    return TokenizerCounter(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
