"""The recorder never drops an event silently: one the outbox refused waits and goes first."""

from __future__ import annotations

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


def test_a_refused_event_is_kept_and_saved_first_at_the_next_append(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    recorder = UsageRecorder(FailingOnce(outbox))  # type: ignore[arg-type]
    first, second = make_event(), make_event()
    recorder.record_now(first)
    assert outbox.pending() == 0
    recorder.record_now(second)
    assert [event.event_id for _, event in outbox.peek(10)] == [first.event_id, second.event_id]
