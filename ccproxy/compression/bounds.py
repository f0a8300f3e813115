"""How big a request's messages are, measured before any segmentation, and the caps on it.

Segmenting and scoring grow with the input: millions of tiny paragraphs make millions of units.
A request over a cap is forwarded untouched (outcome ``too_large``), never refused for its size:
the upstream is the judge of what it accepts. The walk stops as soon as a cap is crossed, so
measuring a hostile body costs no more than measuring one at the cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SizeCaps:
    max_chars: int
    max_messages: int
    max_parts: int
    max_units: int
    max_lines: int


@dataclass(frozen=True)
class RequestSize:
    messages: int
    parts: int  # content parts, all messages together
    chars: int  # text the segmenter would read: contents, text parts, tool-call arguments
    lines: int  # line breaks in that text: the segmenter reads text line by line
    over_cap: str | None  # the first cap crossed ("chars", "lines", "messages", "parts"), else None


def _tool_argument_chars(message: dict[str, Any]) -> int:
    chars = 0
    calls = message.get("tool_calls")
    functions = [call.get("function") for call in calls if isinstance(call, dict)] if isinstance(calls, list) else []
    functions.append(message.get("function_call"))
    for function in functions:
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            chars += len(function["arguments"])
    return chars


def measure(messages: Sequence[Any], caps: SizeCaps) -> RequestSize:
    """The request's size, walked only until the first cap is crossed."""
    if len(messages) > caps.max_messages:
        return RequestSize(len(messages), 0, 0, 0, "messages")
    parts = chars = lines = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        texts: list[str] = []
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            parts += len(content)
            if parts > caps.max_parts:
                return RequestSize(len(messages), parts, chars, lines, "parts")
            texts.extend(text for part in content if isinstance(text := _part_text(part), str))
        chars += sum(len(text) for text in texts) + _tool_argument_chars(message)
        if chars > caps.max_chars:
            return RequestSize(len(messages), parts, chars, lines, "chars")
        lines += sum(text.count("\n") for text in texts)
        if lines > caps.max_lines:
            return RequestSize(len(messages), parts, chars, lines, "lines")
    return RequestSize(len(messages), parts, chars, lines, None)


def _part_text(part: Any) -> Any:
    return part.get("text") if isinstance(part, dict) else None
