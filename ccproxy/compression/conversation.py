"""The conversation as the compression core sees it, whatever API it came in on.

Chat completions, the Responses API and Anthropic's Messages API each spell a conversation
their own way (messages, input items, content blocks). An adapter per wire format
(``ccproxy/adapters/``) parses the request into ``Turn`` s and renders the kept text back;
segmentation, scoring, selection and the history memo read only what is here.

A turn is one message, one input item, or one slice of a message (an Anthropic user message
holding tool results and a question is two turns: the results answer a call, the question is
the user's). Its parts are the texts the compressor may shorten, in order, with ``None`` for a
part it must carry through untouched (an image, a thinking block, a document).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

P = TypeVar("P")
Role = Literal["system", "user", "assistant", "tool", "other"]


@dataclass(frozen=True)
class Turn:
    role: Role
    parts: tuple[str | None, ...]  # each part's text; None: a part without text to cut
    # The parts are one plain string, not a list (chat's ``"content": "…"``): rebuilding it
    # with nothing kept removes the turn rather than leaving an empty list.
    plain: bool = False
    calls: tuple[str, ...] = ()  # the tool-call ids this turn issues
    call_text: str = ""  # what the scorer reads of those calls: ``name(arguments)`` lines
    answers: str | None = None  # the call id this turn answers (a tool result)
    # The wire format forbids changing it: a reasoning item, a thinking block's message, text at
    # or before a cache breakpoint. A pinned turn is one protected unit.
    pinned: bool = False
    # Kept or dropped whole, never shortened (an assistant message holding a signed thinking block).
    atomic: bool = False
    # Content of a shape the adapter does not know: one protected unit, forwarded untouched.
    opaque: bool = False
    # The wire JSON the turn came from; only hashed (the history memo's key), never read.
    source: Any = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        return PART_JOINER.join(part for part in self.parts if part is not None)


# Text from several parts joined into one unit text for the scorer to read.
PART_JOINER = "\n\n"


@dataclass(frozen=True)
class TurnEdit:
    """How one turn is forwarded when compression changed it."""

    dropped: bool = False  # the whole turn goes
    # part index -> its new text, or None when the part goes; parts not named stay as they are
    texts: tuple[tuple[int, str | None], ...] = ()


# Per turn: None (forwarded as it came) or its edit.
Edits = tuple[TurnEdit | None, ...]


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    # The request up to turn ``end`` as a chat-completions body, for counting the prompt the
    # upstream bills (the framing around the units); None when the wire format has no such view.
    chat_prefix: Callable[[int], dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    # Keeps one wire format's memo entries apart from another's (``chat``, ``responses``, …).
    wire: Hashable = "chat"

    def __len__(self) -> int:
        return len(self.turns)


def unchanged(turns: Sequence[Turn]) -> Edits:
    return (None,) * len(turns)


@dataclass(frozen=True)
class WireFormat(Generic[P]):
    """An adapter: a request's conversation (``P``: chat's messages list, a Responses or
    Messages body) into turns, and the compressor's edits back into the same shape."""

    name: str
    parse: Callable[[P], Conversation]
    render: Callable[[P, Edits], P]
    # How many messages or items the payload holds, read without parsing it: a request over the
    # message cap is forwarded untouched before any work grows with it.
    count: Callable[[P], int] = len  # type: ignore[assignment]
