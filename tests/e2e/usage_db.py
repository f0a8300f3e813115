"""Reading the usage events a served gateway wrote to the e2e PostgreSQL database."""

from __future__ import annotations

import time

import psycopg


def account_events(database_url: str, account: str) -> list[dict]:
    with psycopg.connect(database_url) as db, db.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        cursor.execute(
            "SELECT e.* FROM ccproxy_usage_events e JOIN ccproxy_accounts a ON a.id = e.account_id"
            " WHERE a.name = %s ORDER BY e.created_at",
            (account,),
        )
        return cursor.fetchall()


def wait_for_events(database_url: str, account: str, count: int, timeout_s: float = 30) -> list[dict]:
    """The account's events once there are ``count`` (the gateway flushes every 0.2 s in tests),
    or whatever is there at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = account_events(database_url, account)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.2)
