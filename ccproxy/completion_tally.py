"""The completion a streamed answer delivered so far, for billing a stream that ended early.

The upstream reports usage only in the stream's last chunk. A stream the caller drops, or that
breaks mid-way, never gets there, yet the provider billed every token it generated. The tally
keeps the generated text (content, refusals, tool-call arguments) in memory, bounded, only
until the request's usage event is written; the text itself is never stored or logged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# A completion longer than this is not held whole: the rest is estimated from its length
# (4 characters a token, the usual figure for English BPE text).
MAX_TALLY_CHARS = 1 << 20
CHARS_PER_TOKEN_ESTIMATE = 4


def _delta_texts(chunk: Any) -> list[str]:
    texts: list[str] = []
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        for name in ("content", "refusal", "reasoning_content"):
            if isinstance(delta.get(name), str):
                texts.append(delta[name])
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                texts.extend(v for k in ("name", "arguments") if isinstance(v := function.get(k), str))
    return texts


class CompletionTally:
    def __init__(self, max_chars: int = MAX_TALLY_CHARS) -> None:
        self._pieces: list[str] = []
        self._held = 0
        self._overflow = 0  # characters seen beyond max_chars, counted but not kept
        self._max_chars = max_chars

    def feed(self, chunk: Any) -> None:
        """One chat chunk's payload, as the usage tap parsed it (``usage_tap.chunk_of``)."""
        for text in _delta_texts(chunk):
            self.feed_text(text)

    def feed_text(self, text: str) -> None:
        """Generated text of any API's stream (a Responses or Messages delta)."""
        room = self._max_chars - self._held
        kept = text[: max(0, room)]
        if kept:
            self._pieces.append(kept)
            self._held += len(kept)
        self._overflow += len(text) - len(kept)

    def tokens(self, count_texts: Callable[[Sequence[str]], list[int]]) -> int:
        """Completion tokens seen: the held text counted with the model's tokenizer, plus an
        estimate for any overflow."""
        held = sum(count_texts(["".join(self._pieces)])) if self._pieces else 0
        return held + -(-self._overflow // CHARS_PER_TOKEN_ESTIMATE)
