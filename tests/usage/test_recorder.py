"""The recorder never drops an event silently: one the outbox refused waits and goes first."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ccproxy.usage.outbox import Outbox
from ccproxy.usage.recorder import UsageRecorder
from tests.usage.helpers import make_event


class FailingOnce:
    """A real outbox whose first append fails, as a full disk would make it."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.failed = False

    def append(self, event) -> None:  # type: ignore[no-untyped-def]
        if not self.failed:
            self.failed = True
            raise OSError("disk full")
        self.outbox.append(event)

    def append_raw(self, payload: str) -> None:
        self.outbox.append_raw(payload)


def test_a_refused_event_is_kept_and_saved_first_at_the_next_append(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    recorder = UsageRecorder(FailingOnce(outbox))  # type: ignore[arg-type]
    first, second = make_event(), make_event()
    recorder.record_now(first)
    assert outbox.pending() == 0
    recorder.record_now(second)
    assert [event.event_id for _, event in outbox.peek(10)] == [first.event_id, second.event_id]


class Refusing:
    """An outbox that refuses every append, as one on a locked or read-only file would."""

    def append(self, event) -> None:  # type: ignore[no-untyped-def]
        raise OSError("database is locked")

    def append_raw(self, payload: str) -> None:
        raise OSError("database is locked")


def test_refused_events_survive_a_restart_through_the_spill_file(tmp_path: Path) -> None:
    from ccproxy.usage.spill import SpillFile

    spill = SpillFile(tmp_path / "usage-spill.jsonl")
    recorder = UsageRecorder(Refusing(), spill)  # type: ignore[arg-type]
    events = [make_event() for _ in range(3)]
    for e in events:
        recorder.record_now(e)
    del recorder  # the process dies: nothing of it is held in memory any more
    assert len(spill.path.read_text().splitlines()) == 3
    outbox = Outbox(tmp_path / "outbox.sqlite")
    UsageRecorder(outbox, SpillFile(tmp_path / "usage-spill.jsonl"))  # the next start
    assert [e.event_id for _, e in outbox.peek(10)] == [e.event_id for e in events]
    assert not spill.has_lines()


def test_spilled_events_go_to_the_outbox_once_it_accepts_again(tmp_path: Path) -> None:
    from ccproxy.usage.spill import SpillFile

    outbox = Outbox(tmp_path / "outbox.sqlite")
    spill = SpillFile(tmp_path / "usage-spill.jsonl")
    recorder = UsageRecorder(FailingOnce(outbox), spill)  # type: ignore[arg-type]
    first, second = make_event(), make_event()
    recorder.record_now(first)  # refused: spilled
    assert outbox.pending() == 0 and spill.has_lines()
    recorder.record_now(second)
    assert sorted(e.event_id for _, e in outbox.peek(10)) == sorted([first.event_id, second.event_id])
    assert not spill.has_lines()


def test_when_the_spill_file_refuses_too_memory_is_bounded_and_drops_are_counted(
    tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    import logging

    from ccproxy.usage.spill import SpillFile

    (tmp_path / "not-a-dir").write_text("")
    blocked = tmp_path / "not-a-dir" / "usage-spill.jsonl"  # under a file: every append fails
    drops: list[int] = []
    recorder = UsageRecorder(
        Refusing(), SpillFile(blocked), max_held=2, on_drop=lambda: drops.append(1)  # type: ignore[arg-type]
    )
    events = [make_event(model="secret-model-name") for _ in range(5)]
    with caplog.at_level(logging.ERROR, logger="ccproxy.usage"):
        for e in events:
            recorder.record_now(e)
    assert len(drops) == 3
    assert [e.event_id for e in recorder._held] == [e.event_id for e in events[3:]]
    assert all(e.event_id in caplog.text for e in events[:3])
    assert "secret-model-name" not in caplog.text


def test_a_torn_spill_line_reaches_the_dead_letters_not_the_floor(tmp_path: Path) -> None:
    from ccproxy.usage.flusher import UsageFlusher
    from ccproxy.usage.spill import SpillFile
    from ccproxy.usage.store import SqliteStore

    good = make_event()
    path = tmp_path / "usage-spill.jsonl"
    path.write_text(good.to_json() + "\n" + good.to_json()[:40])  # killed mid-write
    outbox = Outbox(tmp_path / "outbox.sqlite")
    UsageRecorder(outbox, SpillFile(path))
    assert outbox.pending() == 2
    store = SqliteStore(tmp_path / "ccproxy.sqlite")
    store.migrate()
    assert UsageFlusher(outbox, store).flush_once() == 2
    assert store.count_events([good.event_id]) == 1
    conn = sqlite3.connect(tmp_path / "ccproxy.sqlite")
    assert conn.execute("SELECT reason FROM ccproxy_usage_dead_letters").fetchall() == [
        ("undecodable:JSONDecodeError",)
    ]
    conn.close()
    store.close()
