"""The recorder's fallback when the outbox refuses an event: an append-only JSONL file in the
data directory, replayed into the outbox at the next start (or once the outbox accepts again).

Several Gateway workers share the data directory. Each line is one write() on a file opened with
O_APPEND, so lines from different processes do not interleave. A replay first claims the file by
renaming it (only one process wins a rename), so a line appended meanwhile goes to a new file
and is not deleted with the old one. A claimed file left by a crash mid-replay is replayed again
later; the events it repeats are skipped by the store (one event_id, one row).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from ccproxy.usage.events import UsageEvent

_CLAIMED = ".claimed-"


class SpillFile:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def append(self, event: UsageEvent) -> None:
        """Durable (fsync) once this returns; raises OSError when the disk refuses it too."""
        line = (event.to_json() + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            written = os.write(fd, line)
            if written != len(line):  # a full disk can cut the write short
                raise OSError(f"short write to the usage spill file ({written} of {len(line)})")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _claim(self) -> list[Path]:
        """Rename the live file to a claimed name; returns every claimed file, oldest first."""
        try:
            self.path.rename(self.path.with_name(f"{self.path.name}{_CLAIMED}{uuid.uuid4().hex}"))
        except FileNotFoundError:
            pass  # nothing spilled, or another process claimed it first
        claimed = self.path.parent.glob(f"{self.path.name}{_CLAIMED}*")
        return sorted(claimed, key=lambda p: p.stat().st_mtime if p.exists() else 0.0)

    def has_lines(self) -> bool:
        return self.path.exists() or any(self.path.parent.glob(f"{self.path.name}{_CLAIMED}*"))

    def replay(self, sink: Callable[[str], None]) -> int:
        """Hand every spilled line to `sink` (the outbox's append_raw), then delete its file.
        When `sink` raises, the file stays claimed for the next replay and the error propagates.
        Returns how many lines were handed over."""
        handed = 0
        for claimed in self._claim():
            try:
                lines = claimed.read_text("utf-8", errors="replace").splitlines()
            except FileNotFoundError:
                continue  # another process replayed and deleted it
            for line in lines:
                if line.strip():
                    sink(line)
                    handed += 1
            claimed.unlink(missing_ok=True)
        return handed
