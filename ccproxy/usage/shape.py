"""Whether an event decoded from the outbox has the field types UsageEvent declares.

The outbox holds plain JSON and `UsageEvent.from_json` checks no types. A value of the wrong
type would reach the driver, and PostgreSQL answers a list where text is expected with a
SQLSTATE 42 error (a mismatch, as a schema fault would give), which the flusher has to retry.
Checked here, such a row is set aside like one that does not decode.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from datetime import datetime
from functools import lru_cache
from typing import Any

from ccproxy.usage.events import UsageEvent


def _accepts(hint: Any, value: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, datetime):
        return isinstance(value, hint)
    return True  # a type this check does not know: the store decides


@lru_cache(maxsize=1)
def _hints() -> tuple[tuple[str, Any], ...]:
    resolved = typing.get_type_hints(UsageEvent)
    return tuple((f.name, resolved[f.name]) for f in fields(UsageEvent))


def wrong_type_field(event: UsageEvent) -> str | None:
    """The first field whose value is not of its declared type, or None."""
    for name, hint in _hints():
        if not _accepts(hint, getattr(event, name)):
            return name
    return None
