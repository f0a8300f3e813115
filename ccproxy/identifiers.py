"""Strings that ccproxy stores, logs or uses as a metric label: bounded and free of control
characters before they go anywhere.

A NUL in ``model`` once reached PostgreSQL's ``text`` column, which refuses it, and stopped the
usage flusher; a multi-megabyte model name was stored and logged whole. Such a value is refused
with a 400 at the door instead. The check is one linear regex scan.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StrictStr

# Longer than any provider's model id (OpenAI's longest are ~40 characters; fine-tunes ~80).
MAX_MODEL_CHARS = 256
# OpenAI's `user` end-user identifier.
MAX_USER_CHARS = 256
# C0 controls, DEL, C1 controls, and UTF-16 surrogates (a lone one cannot be encoded again).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def unsafe_reason(value: str, max_chars: int) -> str | None:
    """Why ``value`` may not be stored or logged, or None. Never quotes the value."""
    if len(value) > max_chars:
        return f"must be at most {max_chars} characters"
    if _UNSAFE.search(value):
        return "must not contain control characters"
    return None


def _checked(max_chars: int):  # type: ignore[no-untyped-def]
    def check(value: str) -> str:
        reason = unsafe_reason(value, max_chars)
        if reason is not None:
            raise ValueError(reason)
        return value

    return check


ModelName = Annotated[StrictStr, AfterValidator(_checked(MAX_MODEL_CHARS))]
EndUserId = Annotated[StrictStr, AfterValidator(_checked(MAX_USER_CHARS))]
