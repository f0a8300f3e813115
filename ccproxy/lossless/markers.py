"""How a dropped stretch is told in the forwarded request, per compression mode.

- ``lossy``: prose just goes; a shortened tool result says how many lines or items went, so the
  model does not take a partial listing for the whole one.
- ``lossless``: each stretch becomes ``[… N chars omitted · ccproxy_retrieve id=<id>]``; its
  original is kept (``RetrievalStore.keep``) and the ``ccproxy_retrieve`` tool hands it back
  (``ccproxy.lossless.loop``).
- ``citation``: the marker names ``GET /v1/retrieve/<id>`` instead; no tool is added.

A marker is a pure function of the account and the dropped text (the id is a keyed hash), so
the same history is forwarded byte for byte on every request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ccproxy.compression.pipeline import Mode
from ccproxy.compression.units import Flavour
from ccproxy.retrieval import OriginalsStore

RETRIEVE_TOOL = "ccproxy_retrieve"
RETRIEVE_DESCRIPTION = (
    "Returns the original text of a passage that was shortened to save tokens. Passages that were "
    "shortened show a marker like [… 1200 chars omitted · ccproxy_retrieve id=<id>]. Call this only when "
    "the omitted text is needed to answer; pass the id from the marker."
)
RETRIEVE_PARAMETERS = {
    "type": "object",
    "properties": {"id": {"type": "string", "description": "The id shown in the marker."}},
    "required": ["id"],
    "additionalProperties": False,
}


def marker(ref: str, chars: int, mode: Mode) -> str:
    if mode == "citation":
        return f"[… {chars} chars omitted · original: /v1/retrieve/{ref}]"
    return f"[… {chars} chars omitted · {RETRIEVE_TOOL} id={ref}]"


def _items_in(stretch: str) -> int | None:
    """How many JSON values the stretch of an array's items holds (the grouped pieces hold
    several each); None when it does not read as items."""
    try:
        items = json.loads(f"[{stretch}]")
    except ValueError:
        return None
    return len(items) if isinstance(items, list) else None


def lossy_note(original: str, flavour: Flavour) -> str | None:
    """What lossy mode says of a dropped stretch: a count for tool output, nothing for prose."""
    if flavour == "lines":
        lines = original.count("\n") + 1
        return f"[… {lines} line{'s' if lines != 1 else ''} omitted]"
    if flavour == "items":
        items = _items_in(original)
        if items is None:
            return None
        return f"[… {items} item{'s' if items != 1 else ''} omitted]"
    return None


@dataclass
class Marking:
    """The ``units.Elide`` of one request: keeps each dropped original for ``account`` and
    says so with a marker (lossless, citation), or a count (lossy). ``made`` counts the
    retrievable markers written: a request with none needs no retrieve tool."""

    mode: Mode
    account: str
    store: OriginalsStore | None
    made: int = 0

    @property
    def tells_turns(self) -> bool:
        return self.mode != "lossy"

    def __call__(self, original: str, count: int, flavour: Flavour) -> str | None:
        if self.mode == "lossy" or self.store is None:
            return lossy_note(original, flavour)
        ref = self.store.keep(self.account, original)
        if ref is None:
            # Too large to keep within the account's bound: forwarded as it came, never lost.
            return original
        self.made += 1
        return marker(ref, len(original), self.mode)
