"""What one request costs and saves, and hourly sums of it.

Privacy rule: an event carries counts, timings and ids only, never message text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

# The summed fields of HourlyTotals, in order.
TOTAL_FIELDS = (
    "requests",
    "tokens_before",
    "tokens_after",
    "tokens_saved",
    "prompt_tokens",
    "completion_tokens",
)

# What an hourly row sums (TOTAL_FIELDS, which /usage reports, plus what billing needs).
HOURLY_SUM_FIELDS = (*TOTAL_FIELDS, "cached_tokens")
# The hourly row's key beside account and hour.
HOURLY_KEY_FIELDS = ("key_id", "model", "kind")
MAX_HOURLY_MODEL = 200


def new_event_id() -> str:
    return str(uuid.uuid4())


def as_utc(value: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is refused rather than guessed."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(timezone.utc)


def hour_of(value: datetime) -> datetime:
    return as_utc(value).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class UsageEvent:
    event_id: str
    account_id: str
    key_id: str | None
    model: str
    tokens_before: int
    tokens_after: int
    tokens_saved: int
    prompt_tokens: int | None
    completion_tokens: int | None
    compression: str
    compression_ms: float
    latency_ms: float
    status: int
    stream: bool
    created_at: datetime
    # Added by migration 0004, with defaults so that events written to the outbox by an older
    # version still decode. `cached_tokens`: the upstream's
    # usage.prompt_tokens_details.cached_tokens (None: not reported). `kind`: what was metered,
    # "chat" (a proxied completion) or "compress" (POST /v1/compress: tokens_before = tokens
    # scored); the price table (ccproxy/pricing.py) prices each kind its own way.
    cached_tokens: int | None = None
    kind: str = "chat"

    def __post_init__(self) -> None:
        # Normalised once here so every store and the outbox see one representation.
        object.__setattr__(self, "created_at", as_utc(self.created_at))

    def counts(self) -> tuple[int, ...]:
        """What this event adds to its hour's totals, in TOTAL_FIELDS order."""
        return (
            1,
            self.tokens_before,
            self.tokens_after,
            self.tokens_saved,
            self.prompt_tokens or 0,
            self.completion_tokens or 0,
        )

    def hourly_key(self) -> tuple[str, str, str]:
        """(key_id, model, kind): with account and hour, the key of its hourly row. The model
        is cut to MAX_HOURLY_MODEL characters: it is part of an index, and a longer name is
        still priced by its prefix."""
        return (self.key_id or "", self.model[:MAX_HOURLY_MODEL], self.kind)

    def billable_cached_tokens(self) -> int:
        """Cached prompt tokens as the hourly totals sum them: at most tokens_after (the
        upstream counts the prompt with its own tokenizer), so that the uncached input
        (tokens_after - cached) of every event, and of every sum of events, is never negative."""
        return max(0, min(self.cached_tokens or 0, self.tokens_after))

    def hourly_counts(self) -> tuple[int, ...]:
        """What this event adds to its hourly row, in HOURLY_SUM_FIELDS order."""
        return (*self.counts(), self.billable_cached_tokens())

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> UsageEvent:
        data = json.loads(text)
        data["created_at"] = datetime.fromisoformat(data["created_at"])
        return cls(**data)


@dataclass(frozen=True)
class HourlyTotals:
    """Sums over one account's events in one UTC hour (or, from `event_totals`, a range)."""

    account_id: str
    hour: datetime
    requests: int
    tokens_before: int
    tokens_after: int
    tokens_saved: int
    prompt_tokens: int
    completion_tokens: int

    def counts(self) -> tuple[int, ...]:
        """The sums in TOTAL_FIELDS order."""
        return tuple(getattr(self, name) for name in TOTAL_FIELDS)
