"""Builders and raw-SQL helpers shared by the usage tests."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ccproxy.usage.events import UsageEvent, new_event_id

TABLES = (
    "ccproxy_usage_events",
    "ccproxy_usage_hourly",
    "ccproxy_api_keys",
    "ccproxy_accounts",
    "ccproxy_billing_batches",
    "ccproxy_billing_ledger",
    "ccproxy_billing_lines",
    "ccproxy_usage_dead_letters",
)
Query = Callable[[str], list[tuple[Any, ...]]]
BASE = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)


def make_event(
    account_id: str = "acct_a", created_at: datetime | None = None, **overrides: Any
) -> UsageEvent:
    fields: dict[str, Any] = dict(
        event_id=new_event_id(),
        account_id=account_id,
        key_id="key_1",
        model="gpt-4o-mini",
        tokens_before=1000,
        tokens_after=400,
        tokens_saved=600,
        prompt_tokens=410,
        completion_tokens=25,
        compression="compressed",
        compression_ms=12.5,
        latency_ms=340.25,
        status=200,
        stream=False,
        created_at=created_at or BASE,
    )
    fields.update(overrides)
    return UsageEvent(**fields)


def spread_events(n: int, accounts: tuple[str, ...] = ("acct_a", "acct_b")) -> list[UsageEvent]:
    """n events over several accounts and hours, with varied counts and some null usage."""
    return [
        make_event(
            account_id=accounts[i % len(accounts)],
            created_at=BASE + timedelta(minutes=17 * i, microseconds=i),
            tokens_before=100 + i,
            tokens_after=60 + i // 2,
            tokens_saved=40 + i - i // 2,
            prompt_tokens=None if i % 5 == 0 else 60 + i,
            completion_tokens=None if i % 7 == 0 else i,
            stream=i % 2 == 0,
        )
        for i in range(n)
    ]


def free_port() -> int:
    """A loopback port where nothing listens (closed right after the OS picked it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_query(url: str) -> Callable[[str], list[tuple[Any, ...]]]:
    import psycopg

    def query(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description is not None else []

    return query


def sqlite_query(path: Path) -> Callable[[str], list[tuple[Any, ...]]]:
    def query(sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description is not None else []
        finally:
            conn.close()

    return query
