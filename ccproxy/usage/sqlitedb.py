"""Opening an SQLite file the way the store and the outbox both need it: WAL, autocommit,
shared between threads (callers hold a lock) and between processes (busy timeout)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Literal


def connect(
    path: Path, *, busy_timeout_s: float, synchronous: Literal["NORMAL", "FULL"]
) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit BEGIN; transactions are explicit where there are any.
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            # Turning a new file to WAL takes a lock that SQLite does not wait for, so processes
            # opening the same new file at once can get "database is locked" here.
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn
