"""How big a request's conversation is, measured before any segmentation, and the caps on it.

Segmenting and scoring grow with the input: millions of tiny paragraphs make millions of units.
A request over a cap is forwarded untouched (outcome ``too_large``), never refused for its size:
the upstream is the judge of what it accepts. The walk stops as soon as a cap is crossed, so
measuring a hostile body costs no more than measuring one at the cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ccproxy.compression.conversation import Turn


@dataclass(frozen=True)
class SizeCaps:
    max_chars: int
    max_messages: int
    max_parts: int
    max_units: int
    max_lines: int


@dataclass(frozen=True)
class RequestSize:
    messages: int  # turns: messages, items
    parts: int  # content parts, all turns together
    chars: int  # text the segmenter would read: contents, text parts, tool-call arguments
    lines: int  # line breaks in that text: the segmenter reads text line by line
    over_cap: str | None  # the first cap crossed ("chars", "lines", "messages", "parts"), else None


def measure(turns: Sequence[Turn], caps: SizeCaps) -> RequestSize:
    """The conversation's size, walked only until the first cap is crossed."""
    if len(turns) > caps.max_messages:
        return RequestSize(len(turns), 0, 0, 0, "messages")
    parts = chars = lines = 0
    for turn in turns:
        parts += 0 if turn.plain else len(turn.parts)  # a plain string is no content part
        if parts > caps.max_parts:
            return RequestSize(len(turns), parts, chars, lines, "parts")
        texts = [text for text in turn.parts if text is not None]
        chars += sum(len(text) for text in texts) + len(turn.call_text)
        if chars > caps.max_chars:
            return RequestSize(len(turns), parts, chars, lines, "chars")
        lines += sum(text.count("\n") for text in texts)
        if lines > caps.max_lines:
            return RequestSize(len(turns), parts, chars, lines, "lines")
    return RequestSize(len(turns), parts, chars, lines, None)
