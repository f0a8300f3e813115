"""One unstorable usage event must not stop accounting for everyone (issue 15).

A NUL in ``model`` once reached PostgreSQL's ``text`` column, which refuses it; the flusher
retried that batch forever and /usage and billing went stale. Today the Gateway refuses such a
model with a 400, so the poisoned event is planted in the running Gateway's outbox directly, as
an older version (or any future bug) would have left it. Then 50 normal requests: each of their
events reaches PostgreSQL and /usage, and the poisoned one waits in the dead-letter table.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psycopg
import pytest

from ccproxy.usage.events import UsageEvent
from ccproxy.usage.outbox import Outbox
from harness.servers import create_key
from tests.e2e.usage_db import wait_for_events

pytestmark = pytest.mark.e2e

ACCOUNT = "poisoned-usage"
NORMAL_REQUESTS = 50


def _account_id(database_url: str) -> str:
    with psycopg.connect(database_url) as db:
        row = db.execute("SELECT id FROM ccproxy_accounts WHERE name = %s", (ACCOUNT,)).fetchone()
    assert row is not None
    return str(row[0])


def _poisoned(account_id: str) -> UsageEvent:
    return UsageEvent(
        event_id=str(uuid.uuid4()), account_id=account_id, key_id=None, model="fault-ok\u0000poison",
        tokens_before=10, tokens_after=10, tokens_saved=0, prompt_tokens=10, completion_tokens=1,
        compression="disabled", compression_ms=0.0, latency_ms=1.0, status=200, stream=False,
        created_at=datetime.now(timezone.utc),
    )


def test_a_poisoned_event_is_dead_lettered_and_every_other_event_is_counted(
    faults_gateway: str, database_url: str, logs_dir: Path
) -> None:
    key = create_key({"CCPROXY_DATABASE_URL": database_url}, ACCOUNT)
    headers = {"x-api-key": key}
    refused = httpx.post(
        f"{faults_gateway}/v1/chat/completions", headers=headers, timeout=30,
        json={"model": "fault-ok\u0000", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"

    poison = _poisoned(_account_id(database_url))
    outbox = Outbox(logs_dir / "faults-data" / "usage-outbox.sqlite")  # the Gateway's own file
    try:
        outbox.append(poison)
    finally:
        outbox.close()
    for _ in range(NORMAL_REQUESTS):
        answer = httpx.post(
            f"{faults_gateway}/v1/chat/completions", headers=headers, timeout=30,
            json={"model": "fault-ok", "messages": [{"role": "user", "content": "Say hello."}]},
        )
        assert answer.status_code == 200

    events = wait_for_events(database_url, ACCOUNT, NORMAL_REQUESTS)
    assert len(events) == NORMAL_REQUESTS  # the 400 wrote no event; the poisoned one is apart
    usage = httpx.get(f"{faults_gateway}/usage", headers=headers, timeout=30).json()
    assert usage["totals"]["requests"] == NORMAL_REQUESTS
    with psycopg.connect(database_url) as db:
        letters = db.execute(
            "SELECT reason, event FROM ccproxy_usage_dead_letters WHERE event_id = %s", (poison.event_id,)
        ).fetchall()
    assert len(letters) == 1
    reason, stored = letters[0]
    assert "DataError" in reason and "\u0000" not in stored
