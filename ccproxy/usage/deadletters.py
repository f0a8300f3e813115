"""An outbox row that can never be stored, as the dead-letter table keeps it.

The row is kept whole (up to a cap) so that someone can fix and replay it, with why it was set
aside: an error class and SQLSTATE, never the driver's message (it can quote values). Its text
is made storable first: the dead-letter write must not fail for the very reason the row did.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ccproxy.usage.events import UsageEvent

# A normal event is ~400 characters as JSON; the cap keeps a multi-MB model name out of the
# table (and out of any index), while the start of the row still shows what it was.
MAX_EVENT_CHARS = 16_384
# event_id and account_id are indexed and shown in tools: a sane id fits easily.
MAX_ID_CHARS = 200


def _storable_char(c: str) -> str:
    code = ord(c)
    # C0 controls (NUL among them: PostgreSQL text cannot hold it), DEL, C1 controls and lone
    # surrogates (not encodable as UTF-8) become \\uXXXX, as JSON writes them.
    if code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return c


def storable(text: str, limit: int) -> str:
    """`text` with every character that a text column or a log reader could choke on escaped,
    cut to at most `limit` characters. Outbox JSON is ASCII with escapes already, so for it
    this is the identity until the cap."""
    out = "".join(_storable_char(c) for c in text[:limit])
    return out[:limit]


@dataclass(frozen=True)
class DeadLetter:
    letter_id: str  # SHA-256 of the outbox row: writing the same letter twice stores one
    event_id: str | None
    account_id: str | None
    reason: str
    event: str  # the outbox row, storable(), at most MAX_EVENT_CHARS
    event_chars: int  # the row's length before the cap


def _ids(raw: str, event: UsageEvent | None) -> tuple[str | None, str | None]:
    found: list[object] = [None, None]
    if event is not None:
        found = [event.event_id, event.account_id]
    else:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if isinstance(data, dict):
            found = [data.get("event_id"), data.get("account_id")]
    # A row that failed its type check can hold anything in these fields.
    event_id, account_id = (value if isinstance(value, str) else None for value in found)
    return event_id, account_id


def dead_letter(raw: str, reason: str, event: UsageEvent | None = None) -> DeadLetter:
    """The dead letter for the outbox row `raw`; `event` is what it decoded to, if it did."""
    event_id, account_id = _ids(raw, event)
    return DeadLetter(
        letter_id=hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest(),
        event_id=None if event_id is None else storable(event_id, MAX_ID_CHARS),
        account_id=None if account_id is None else storable(account_id, MAX_ID_CHARS),
        reason=storable(reason, MAX_ID_CHARS),
        event=storable(raw, MAX_EVENT_CHARS),
        event_chars=len(raw),
    )
