from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from ccproxy.usage.events import UsageEvent, hour_of, new_event_id
from tests.usage.helpers import make_event


def test_json_round_trip_keeps_every_field() -> None:
    at = datetime(2024, 5, 1, 10, 7, 3, 123456, tzinfo=timezone.utc)
    event = make_event(prompt_tokens=None, stream=True, created_at=at)
    assert UsageEvent.from_json(event.to_json()) == event


def test_created_at_is_normalised_to_utc_and_naive_is_refused() -> None:
    plus_two = timezone(timedelta(hours=2))
    event = make_event(created_at=datetime(2024, 5, 1, 12, 0, tzinfo=plus_two))
    assert event.created_at == datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)
    assert event.created_at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="naive"):
        make_event(created_at=datetime(2024, 5, 1, 12, 0))


def test_event_has_counts_and_ids_only() -> None:
    # The privacy rule: nothing that could hold message text.
    names = {f.name for f in dataclasses.fields(UsageEvent)}
    assert not names & {"messages", "content", "prompt", "text", "body", "response"}
    assert set(json.loads(make_event().to_json())) == names


def test_new_event_id_is_a_uuid4() -> None:
    assert uuid.UUID(new_event_id()).version == 4
    assert new_event_id() != new_event_id()


def test_hour_of_truncates_in_utc() -> None:
    est = timezone(timedelta(hours=-5))
    assert hour_of(datetime(2024, 5, 1, 23, 59, 59, 999999, tzinfo=est)) == datetime(
        2024, 5, 2, 4, 0, tzinfo=timezone.utc
    )
