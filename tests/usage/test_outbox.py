from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ccproxy.usage.outbox import Outbox
from tests.usage.helpers import make_event

REPO = Path(__file__).resolve().parents[2]

# Appends N events, says "ok", then waits to be killed.
_CHILD = """
import sys, time
from ccproxy.usage.outbox import Outbox
from tests.usage.helpers import make_event
outbox = Outbox(sys.argv[1])
for i in range(int(sys.argv[2])):
    outbox.append(make_event(tokens_before=i))
print("ok", flush=True)
time.sleep(120)
"""


def test_append_peek_remove(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    events = [make_event(tokens_before=i) for i in range(5)]
    for e in events:
        outbox.append(e)
    assert outbox.pending() == 5
    first = outbox.peek(3)
    assert [e for _, e in first] == events[:3]
    outbox.remove([seq for seq, _ in first])
    assert [e for _, e in outbox.peek(10)] == events[3:]
    outbox.remove([])
    assert outbox.pending() == 2
    outbox.close()


def test_seqs_are_never_reused(tmp_path: Path) -> None:
    # A flusher holding an old peek must not be able to remove a newer event.
    outbox = Outbox(tmp_path / "outbox.sqlite")
    outbox.append(make_event())
    old = [seq for seq, _ in outbox.peek(10)]
    outbox.remove(old)
    outbox.append(make_event())
    outbox.remove(old)  # a stale, repeated remove
    assert outbox.pending() == 1
    outbox.close()


def test_appended_events_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), "200"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ok"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    outbox = Outbox(path)
    assert outbox.pending() == 200
    assert [e.tokens_before for _, e in outbox.peek(500)] == list(range(200))
    outbox.close()


def test_two_outboxes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    a, b = Outbox(path), Outbox(path)
    per_writer = 100

    def write(outbox: Outbox, account: str) -> None:
        for _ in range(per_writer):
            outbox.append(make_event(account))

    writers = ((a, "acct_a"), (b, "acct_b"), (a, "acct_c"))
    threads = [threading.Thread(target=write, args=writer) for writer in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert a.pending() == b.pending() == 3 * per_writer
    seen = b.peek(1000)
    assert len({e.event_id for _, e in seen}) == 3 * per_writer
    a.remove([seq for seq, _ in seen[:50]])
    assert b.pending() == 3 * per_writer - 50
    a.close()
    b.close()


def _open_at_once(path: Path, workers: int) -> list[Outbox]:
    barrier = threading.Barrier(workers)
    opened: list[Outbox] = []
    errors: list[BaseException] = []

    def open_and_append() -> None:
        try:
            barrier.wait()
            outbox = Outbox(path)
            outbox.append(make_event())
            opened.append(outbox)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_append) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    return opened


def test_workers_opening_a_new_outbox_at_once(tmp_path: Path) -> None:
    # Turning a new file to WAL does not wait for locks; opening must retry, not fail.
    for trial in range(10):
        opened = _open_at_once(tmp_path / f"outbox-{trial}.sqlite", workers=4)
        assert opened[0].pending() == 4
        for outbox in opened:
            outbox.close()
