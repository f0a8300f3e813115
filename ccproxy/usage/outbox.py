"""The durable local buffer of usage events: an SQLite file that requests append to and the
flusher drains into the database.

Durability: WAL with ``synchronous=NORMAL``. A commit in WAL mode has written its frames to
the WAL file with write() before `append` returns, so the bytes are in the kernel's page cache
and survive the process being SIGKILLed (or crashing) the instant after; only an OS crash or
power cut can lose the last commits, never corrupt the file. FULL would also fsync every
append, one disk flush per request on the hot path; pass ``synchronous="FULL"`` where a power
cut must not lose a single event.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from ccproxy.usage import sqlitedb
from ccproxy.usage.events import UsageEvent

_SCHEMA = (
    # AUTOINCREMENT: a seq is never reused. Without it an emptied table starts again at 1, and a
    # second flusher holding seqs from an older peek could `remove` a new, undelivered event.
    "CREATE TABLE IF NOT EXISTS usage_outbox "
    "(seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL)"
)
_CHUNK = 500


class Outbox:
    """Thread-safe; several processes (gateway workers) may open the same file."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout_s: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # Autocommit: a statement outside BEGIN is its own transaction, committed on return.
        self._conn = sqlitedb.connect(
            self.path, busy_timeout_s=busy_timeout_s, synchronous=synchronous
        )
        self._conn.execute(_SCHEMA)

    def append(self, event: UsageEvent) -> None:
        """Durable (against a crash of this process) once this returns."""
        self.append_raw(event.to_json())

    def append_raw(self, payload: str) -> None:
        """Append a row as text, undecoded: replaying a spill file (ccproxy/usage/spill.py)
        must not lose a torn line, which the flusher then sets aside as undecodable."""
        with self._lock:
            self._conn.execute("INSERT INTO usage_outbox (event) VALUES (?)", (payload,))

    def peek(self, limit: int) -> list[tuple[int, UsageEvent]]:
        """Up to `limit` events, oldest first, with the seqs that `remove` takes. Raises when
        a row does not decode; the flusher uses `peek_raw` and decodes row by row."""
        return [(seq, UsageEvent.from_json(text)) for seq, text in self.peek_raw(limit)]

    def peek_raw(self, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` rows as stored (event JSON), oldest first, with their seqs."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, event FROM usage_outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(int(seq), str(text)) for seq, text in rows]

    def oldest_created_at(self) -> datetime | None:
        """When the oldest pending event happened; None when the outbox is empty or that row
        does not decode (the flusher is about to set it aside). By the primary key: cheap."""
        rows = self.peek_raw(1)
        if not rows:
            return None
        try:
            return UsageEvent.from_json(rows[0][1]).created_at
        except Exception:  # any undecodable row; reported by the flusher, not here
            return None

    def remove(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(seqs), _CHUNK):
                    chunk = list(seqs[i : i + _CHUNK])
                    marks = ", ".join(["?"] * len(chunk))
                    self._conn.execute(f"DELETE FROM usage_outbox WHERE seq IN ({marks})", chunk)
                self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # keep the first error
                    self._conn.execute("ROLLBACK")
                raise

    def pending(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM usage_outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
