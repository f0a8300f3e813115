"""Conversation turns -> scoreable units, and kept units -> edits of those turns.

A *unit* is the smallest piece of context the policy may keep or drop: a short history turn,
a paragraph or sentence of a long message, a fenced code block, a JSON block, a markdown table,
or a whole tool exchange (the turn that issues tool calls with every turn that answers one).
Some units are *protected* and always survive: system turns (configurable), parts without text
(images, audio, thinking blocks, …), pinned turns, the current question, and everything after
the last user turn (the turn in progress).

The turns come from an adapter (``ccproxy/adapters/``): this module never reads an API's JSON.
Rebuilding works on character offsets into the original text, so keeping every unit changes
nothing, and a partial rebuild only removes whole units: it never rewrites the inside of a unit,
and the adapter that renders the edits never touches a message's other keys.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ccproxy.compression.conversation import PART_JOINER, Edits, Turn, TurnEdit

UnitKind = Literal[
    "turn",
    "paragraph",
    "sentence",
    "code",
    "table",
    "json",
    "tool_exchange",
    "tool_call",  # an agent step's call: kept
    "tool_result",  # a piece of an agent step's tool output
    "query",
    "system",
    "other",
]



@dataclass(frozen=True)
class Unit:
    index: int  # position in Segmentation.units (document order)
    text: str  # the text a scorer reads for this unit
    kind: UnitKind
    protected: bool  # never dropped
    message_index: int  # the (first) turn it belongs to


# What the atoms of a field are, which decides how a dropped stretch of them is told: prose
# (sentences, paragraphs), lines of tool output, or items of a JSON array (told as a JSON
# string item, so the array stays valid JSON); "turn": a whole turn dropped as one unit.
Flavour = Literal["text", "lines", "items", "turn"]


class Elide(Protocol):
    """What replaces a dropped stretch: ``original`` is its text, ``count`` how many units it
    held. None: nothing (the stretch just goes)."""

    # A turn dropped as one unit stays, its text parts told (lossless mode), rather than going.
    tells_turns: bool

    def __call__(self, original: str, count: int, flavour: Flavour) -> str | None: ...


@dataclass(frozen=True)
class _Field:
    """One text that rebuild may shorten: one text part of a turn.

    The text equals ``leading + atoms[0] + separators[0] + atoms[1] + … + trailing``.
    """

    part_index: int  # the index in the turn's parts
    leading: str
    atoms: tuple[tuple[int, str], ...]  # (unit index, text)
    separators: tuple[str, ...]  # separators[k] lies between atoms[k] and atoms[k + 1]
    trailing: str
    flavour: Flavour = "text"


@dataclass(frozen=True)
class _Plan:
    """How one turn comes back: whole (with its owner unit) or field by field."""

    message_index: int
    owner: int | None  # the unit holding the whole message; None when rebuilt per field
    fields: tuple[_Field, ...] = ()


@dataclass(frozen=True)
class Segmentation:
    units: tuple[Unit, ...]
    query: str  # the question the scorer uses
    turns: tuple[Turn, ...] = field(default=(), repr=False, compare=False)  # what was segmented
    # How each turn comes back, for ``edits``.
    _plans: tuple[_Plan, ...] = field(default=(), repr=False, compare=False)


# --------------------------------------------------------------------------------------------
# Text -> blocks (paragraphs, code, JSON, tables) -> atoms (blocks or sentences)


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    kind: UnitKind


_FENCE_OPEN = re.compile(r"^\s*(`{3,}|~{3,})")
# A sentence ends with . ! ? … (maybe closed by quotes/brackets) and whitespace; CJK full stops
# need no whitespace after them.
# Linear time on any input: a match may only start where a run of end marks starts (the
# lookbehinds), and the possessive quantifiers never give back what they took, so each run is
# read once. Without both, 32 KB of "." took ~11 s (every start retried every shorter run).
_SENTENCE_END = re.compile(
    r"(?<![.!?\u2026])(?:[.!?\u2026]++[\"'\u201d\u2019)\]]*+(\s++))"
    r"|(?<![\u3002\uff01\uff1f])(?:[\u3002\uff01\uff1f]++[\u300d\u300f\u201d\u2019)]*+(\s*+))"
)
_LINE_BREAK = re.compile(r"(\r?\n)")
_TABLE_DELIMITER_CHARS = frozenset("|:- \t")


def _lines(text: str) -> list[tuple[int, str]]:
    """Lines with their start offsets, split on "\\n" only (other breaks stay inside a line)."""
    lines: list[tuple[int, str]] = []
    start = 0
    for line in text.split("\n"):
        lines.append((start, line))
        start += len(line) + 1
    return lines


def _line_end(start: int, line: str) -> int:
    # A block ends at its last visible character: trailing blanks and "\r\n" go to the separator.
    return start + len(line.rstrip())


def _fence_opened(line: str) -> str | None:
    """The fence marker a line opens a code block with, else None."""
    match = _FENCE_OPEN.match(line)
    if match is None:
        return None
    marker = match.group(1)
    # As in CommonMark: ```x``` on one line is inline code, not a fence.
    if marker[0] == "`" and "`" in line[match.end() :]:
        return None
    return marker


def _closes_fence(line: str, marker: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(marker) and set(stripped) == {marker[0]}


def _is_table_delimiter(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and "-" in stripped and "|" in stripped and set(stripped) <= _TABLE_DELIMITER_CHARS


def _holds_table(lines: Sequence[str]) -> bool:
    return any(
        _is_table_delimiter(lines[k]) and "|" in lines[k - 1] for k in range(1, len(lines))
    )


_JSON_DECODER = json.JSONDecoder()
# How far a JSON block may reach across blank lines; bounds the work on text full of "[".
_JSON_MAX_CHARS = 1 << 16


def _decode_json(text: str, start: int, stop: int) -> tuple[int | None, int]:
    """(end of the JSON object/array at ``start`` if it ends its line, else None; how far the
    decoder read), reading no further than ``stop``."""
    try:
        value, length = _JSON_DECODER.raw_decode(text[start:stop])
    except json.JSONDecodeError as error:
        return None, start + error.pos
    end = start + length
    if not isinstance(value, (dict, list)):
        return None, end
    line_break = text.find("\n", end)
    rest_of_line = text[end:] if line_break < 0 else text[end:line_break]
    return (None if rest_of_line.strip() else end), end


def _blocks(text: str) -> list[_Span]:
    """Paragraphs split on blank lines; fenced code, JSON and tables as whole blocks."""
    lines = _lines(text)
    blocks: list[_Span] = []
    # A failed look for JSON across blank lines read this far; starts before it are not retried,
    # which keeps the scan linear.
    json_read_to = -1
    i = 0
    while i < len(lines):
        start, line = lines[i]
        if not line.strip():
            i += 1
            continue
        fence = _fence_opened(line)
        if fence is not None:
            # An unclosed fence runs to the end of the text, like markdown renders it.
            j = i + 1
            while j < len(lines) and not _closes_fence(lines[j][1], fence):
                j += 1
            last = min(j, len(lines) - 1)
            blocks.append(_Span(start, _line_end(*lines[last]), "code"))
            i = last + 1
            continue
        j = i + 1
        while j < len(lines) and lines[j][1].strip() and _fence_opened(lines[j][1]) is None:
            j += 1
        paragraph_end = _line_end(*lines[j - 1])
        first_char = start + len(line) - len(line.lstrip())
        if text[first_char] in "{[":
            json_end, read_to = _decode_json(text, first_char, paragraph_end)
            if json_end is None and read_to >= paragraph_end and first_char >= json_read_to:
                # The paragraph ended mid-value: pretty-printed JSON may hold blank lines.
                stop = min(len(text), first_char + _JSON_MAX_CHARS)
                json_end, json_read_to = _decode_json(text, first_char, stop)
            if json_end is not None:
                blocks.append(_Span(start, json_end, "json"))
                while i < len(lines) and lines[i][0] + len(lines[i][1]) < json_end:
                    i += 1
                i += 1
                continue
        paragraph_lines = [lines[k][1] for k in range(i, j)]
        kind: UnitKind = "table" if _holds_table(paragraph_lines) else "paragraph"
        blocks.append(_Span(start, paragraph_end, kind))
        i = j
    return blocks


class _Room:
    """Atoms a message may still make before the unit cap (None: no cap). Splitting stops as
    the cap is crossed, not after: a paragraph of 150 k short sentences costs ~10 k spans."""

    def __init__(self, limit: int | None, used: int) -> None:
        self.limit = limit
        self.left = None if limit is None else limit - used

    def take(self) -> None:
        if self.left is not None:
            self.left -= 1
            if self.left < 0:
                raise TooManyUnits(self.limit or 0)


_NO_CAP = _Room(None, 0)


def _split_at(text: str, start: int, end: int, pattern: re.Pattern[str], room: _Room = _NO_CAP) -> list[_Span]:
    """Pieces of text[start:end], cut at the last matched group of each pattern match."""
    pieces: list[_Span] = []
    piece_start = start
    for match in pattern.finditer(text, start, end):
        cut_start, cut_end = match.span(match.lastindex or 0)
        if cut_start <= piece_start or cut_end >= end:
            continue  # a cut would leave an empty piece
        room.take()
        pieces.append(_Span(piece_start, cut_start, "sentence"))
        piece_start = cut_end
    pieces.append(_Span(piece_start, end, "sentence"))
    return pieces


def _sentences(text: str, block: _Span, max_chars: int, room: _Room) -> list[_Span]:
    """A long prose paragraph cut into sentences; a sentence still too long, into lines."""
    pieces: list[_Span] = []
    for sentence in _split_at(text, block.start, block.end, _SENTENCE_END, room):
        if sentence.end - sentence.start > max_chars:
            pieces.extend(_split_at(text, sentence.start, sentence.end, _LINE_BREAK, room))
        else:
            pieces.append(sentence)
    return pieces


def _atoms(text: str, blocks: Sequence[_Span], sentence_max_chars: int, room: _Room = _NO_CAP) -> list[_Span]:
    """Blocks, with long prose paragraphs replaced by their sentences."""
    atoms: list[_Span] = []
    for block in blocks:
        if block.kind == "paragraph" and block.end - block.start > sentence_max_chars:
            atoms.extend(_sentences(text, block, sentence_max_chars, room))
        else:
            room.take()
            atoms.append(block)
    return atoms


# --------------------------------------------------------------------------------------------
# Messages -> units


def _texts_of(turn: Turn) -> list[tuple[int, str]]:
    """(part index, text) of each text part."""
    return [(k, text) for k, text in enumerate(turn.parts) if text is not None]


def _non_text_parts(turn: Turn) -> list[int]:
    return [k for k, text in enumerate(turn.parts) if text is None]


def _tool_exchanges(turns: Sequence[Turn]) -> dict[int, list[int]]:
    """Index of each assistant turn that calls tools -> the turns of its exchange."""
    exchanges: dict[int, list[int]] = {}
    # A call id points at the latest assistant that issued it: some servers reuse ids per turn.
    issuer_of: dict[str, int] = {}
    for i, turn in enumerate(turns):
        if turn.role == "assistant" and turn.calls:
            exchanges[i] = [i]
            for call_id in turn.calls:
                issuer_of[call_id] = i
        elif turn.answers is not None and turn.answers in issuer_of:
            exchanges[issuer_of[turn.answers]].append(i)
    return exchanges


def _exchange_text(turns: Sequence[Turn], members: Sequence[int]) -> str:
    """What the scorer reads for a tool exchange: the calls and the results, in order."""
    pieces: list[str] = []
    for i in members:
        for piece in (turns[i].text, turns[i].call_text):
            if piece:
                pieces.append(piece)
    return "\n".join(pieces)


class TooManyUnits(ValueError):
    """Segmentation stopped: the text makes more units than the caller allows. Raised as the
    limit is crossed, so memory never grows past it (3 MB of "a\\n\\n" is ~1 M units)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} units")
        self.limit = limit


class _Builder:
    """Collects units and rebuild plans in document order."""

    def __init__(self, max_units: int | None = None) -> None:
        self.units: list[Unit] = []
        self.plans: list[_Plan] = []
        self.query = ""
        self.max_units = max_units

    def add_unit(self, text: str, kind: UnitKind, protected: bool, message_index: int) -> int:
        index = len(self.units)
        if self.max_units is not None and index >= self.max_units:
            raise TooManyUnits(self.max_units)
        self.units.append(Unit(index, text, kind, protected, message_index))
        return index

    def whole(self, message_index: int, text: str, kind: UnitKind, protected: bool) -> int:
        unit = self.add_unit(text, kind, protected, message_index)
        self.plans.append(_Plan(message_index, unit))
        return unit


class _NonTextUnits:
    """Adds the protected units of non-text parts at their place among the text parts."""

    def __init__(self, builder: _Builder, message_index: int, non_text: Sequence[int]) -> None:
        self.builder = builder
        self.message_index = message_index
        self.pending = deque(non_text)  # popped from the left: a list's pop(0) is quadratic

    def add_before(self, part: int | None) -> None:
        while self.pending and (part is None or self.pending[0] < part):
            self.pending.popleft()
            self.builder.add_unit("", "other", True, self.message_index)

    def add_rest(self) -> None:
        self.add_before(None)


def _field_from_atoms(
    part_index: int, text: str, atoms: Sequence[_Span], unit_of_atom: Sequence[int], flavour: Flavour = "text"
) -> _Field:
    if not atoms:
        return _Field(part_index, text, (), (), "", flavour)
    return _Field(
        part_index=part_index,
        leading=text[: atoms[0].start],
        atoms=tuple((unit, text[a.start : a.end]) for unit, a in zip(unit_of_atom, atoms)),
        separators=tuple(text[a.end : b.start] for a, b in zip(atoms, atoms[1:])),
        trailing=text[atoms[-1].end :],
        flavour=flavour,
    )


def _single_unit(builder: _Builder, i: int, turn: Turn, kind: UnitKind, protected: bool) -> None:
    """The turn's text as one unit; non-text parts beside it stay as protected units."""
    texts = _texts_of(turn)
    non_text = _non_text_parts(turn)
    if not non_text:
        builder.whole(i, turn.text, kind, protected)
        return
    others = _NonTextUnits(builder, i, non_text)
    fields: tuple[_Field, ...] = ()
    if texts:
        others.add_before(texts[0][0])
        unit = builder.add_unit(turn.text, kind, protected, i)
        fields = tuple(_Field(part, "", ((unit, text),), (), "") for part, text in texts)
    others.add_rest()
    builder.plans.append(_Plan(i, None, fields))


def _split_message(
    builder: _Builder,
    i: int,
    turn: Turn,
    atoms_per_text: Sequence[tuple[int, str, list[_Span]]],
    query_from: tuple[int, int] | None = None,
) -> None:
    """A long turn as one unit per atom; from ``query_from`` (text, atom) on, one query unit."""
    others = _NonTextUnits(builder, i, _non_text_parts(turn))
    fields: list[_Field] = []
    query_unit: int | None = None
    query_pieces: list[str] = []
    for t, (part, text, atoms) in enumerate(atoms_per_text):
        others.add_before(part)
        first_query_atom = len(atoms)
        if query_from is not None and t >= query_from[0]:
            first_query_atom = query_from[1] if t == query_from[0] else 0
        context_atoms = atoms[:first_query_atom]
        units = [builder.add_unit(text[a.start : a.end], a.kind, False, i) for a in context_atoms]
        field_atoms = list(context_atoms)
        if first_query_atom < len(atoms):
            # The question stays whole: one span, its original separators inside.
            query_span = _Span(atoms[first_query_atom].start, atoms[-1].end, "query")
            if query_unit is None:
                query_unit = builder.add_unit("", "query", True, i)
            query_pieces.append(text[query_span.start : query_span.end])
            field_atoms.append(query_span)
            units.append(query_unit)
        fields.append(_field_from_atoms(part, text, field_atoms, units))
    others.add_rest()
    if query_unit is not None:
        builder.query = PART_JOINER.join(query_pieces)
        builder.units[query_unit] = Unit(query_unit, builder.query, "query", True, i)
    builder.plans.append(_Plan(i, None, tuple(fields)))


def _query_start(blocks_per_text: Sequence[tuple[int, str, list[_Span]]]) -> tuple[int, int] | None:
    """Where the question starts in a documents + question message, as (text, block).

    The question is the last prose paragraph and whatever follows it: code, JSON or a table
    after it (``Why does this fail?`` + a traceback) belongs to the question. None when the
    question would be the whole message.
    """
    positions = [(t, b) for t, (_, _, blocks) in enumerate(blocks_per_text) for b in range(len(blocks))]
    prose = [
        position
        for position in positions
        if blocks_per_text[position[0]][2][position[1]].kind == "paragraph"
    ]
    if not prose or prose[-1] == positions[0]:
        return None
    return prose[-1]


def _segment_message(
    builder: _Builder,
    i: int,
    turn: Turn,
    *,
    short_kind: UnitKind,
    is_query: bool,
    protected: bool,
    paragraph_min_chars: int,
    sentence_max_chars: int,
) -> None:
    """A turn without tool calls: one unit when short, blocks/sentences when long."""
    text = turn.text
    is_long = len(text) > paragraph_min_chars and not protected
    blocks_per_text = [(part, text, _blocks(text)) for part, text in _texts_of(turn)] if is_long else []
    room = _Room(builder.max_units, len(builder.units))
    if is_query:
        query_from = _query_start(blocks_per_text)
        if query_from is None:
            builder.query = text
            _single_unit(builder, i, turn, "query", True)
            return
        # Documents before the question are ordinary context; cut them like any long message.
        t_query, b_query = query_from
        atoms_per_text = []
        for t, (part, text, blocks) in enumerate(blocks_per_text):
            if t < t_query:
                atoms_per_text.append((part, text, _atoms(text, blocks, sentence_max_chars, room)))
            elif t == t_query:
                context = _atoms(text, blocks[:b_query], sentence_max_chars, room)
                atoms_per_text.append((part, text, context + blocks[b_query:]))
                query_from = (t, len(context))
            else:
                atoms_per_text.append((part, text, list(blocks)))
        _split_message(builder, i, turn, atoms_per_text, query_from)
        return
    atoms_per_text = [
        (part, text, _atoms(text, blocks, sentence_max_chars, room)) for part, text, blocks in blocks_per_text
    ]
    if sum(len(atoms) for _, _, atoms in atoms_per_text) <= 1:
        _single_unit(builder, i, turn, short_kind, protected)
        return
    _split_message(builder, i, turn, atoms_per_text)


@dataclass(frozen=True)
class AgentStep:
    """The turns segmented are one step of an agent loop in the turn in progress: an assistant's
    tool calls and their results. A result of at least ``min_chars`` is cut into pieces of
    lines, to be kept or dropped against ``task`` (the user's request) and the calls' arguments;
    its first piece always stays, so no call is left without a result. ``live``: the step the
    model is about to read, kept whole."""

    task: str
    min_chars: int
    live: bool = False


# Lines of tool output are grouped into pieces of about this many characters: one unit per
# line would make a 10 k-line log 10 k units.
TOOL_PIECE_CHARS = 400


def _line_pieces(text: str, room: _Room) -> list[_Span]:
    """Runs of whole lines of ``text``, each ending where it passes TOOL_PIECE_CHARS."""
    pieces: list[_Span] = []
    start = 0
    for match in _LINE_BREAK.finditer(text):
        if match.start() - start >= TOOL_PIECE_CHARS:
            room.take()
            pieces.append(_Span(start, match.start(), "tool_result"))
            start = match.end()
    if start < len(text):
        room.take()
        pieces.append(_Span(start, len(text), "tool_result"))
    return [piece for piece in pieces if text[piece.start : piece.end].strip()]


_JSON_SPACE = re.compile(r"\s*")


def _json_array_items(text: str) -> list[_Span] | None:
    """The items of ``text`` when it is one JSON array (search results, rows, records), as
    spans; None otherwise. Each item is read once by the decoder: linear in the text."""
    start = _JSON_SPACE.match(text).end()  # type: ignore[union-attr]
    if not text.startswith("[", start):
        return None
    items: list[_Span] = []
    position = _JSON_SPACE.match(text, start + 1).end()  # type: ignore[union-attr]
    if text.startswith("]", position):
        return None
    while True:
        try:
            _, end = _JSON_DECODER.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        items.append(_Span(position, end, "tool_result"))
        position = _JSON_SPACE.match(text, end).end()  # type: ignore[union-attr]
        if text.startswith("]", position):
            rest = text[position + 1 :]
            return items if not rest.strip() else None
        if not text.startswith(",", position):
            return None
        position = _JSON_SPACE.match(text, position + 1).end()  # type: ignore[union-attr]


def _grouped(items: list[_Span], min_chars: int, room: _Room) -> list[_Span]:
    """Consecutive items joined into pieces of at least ``min_chars`` (the text between them,
    commas and all, stays inside a piece)."""
    pieces: list[_Span] = []
    for item in items:
        if pieces and pieces[-1].end - pieces[-1].start < min_chars:
            pieces[-1] = _Span(pieces[-1].start, item.end, "tool_result")
        else:
            room.take()
            pieces.append(item)
    return pieces


# A top-level definition in the common languages: where a file's next piece starts. Decorators,
# comments and blank lines just above it go with it.
_DEFINITION = re.compile(
    r"(?:(?:export\s+)?(?:default\s+)?(?:async\s+)?(?:def|class|function|fn|func|interface|struct|enum|trait|impl|type)\b"
    r"|(?:pub(?:\([a-z]+\))?\s+)(?:async\s+)?(?:fn|struct|enum|trait|mod)\b)"
)
_LEADING = re.compile(r"@|#|//|/\*|\*|--")


def _code_pieces(text: str, room: _Room) -> list[_Span] | None:
    """Source code cut at its top-level definitions (a function, a class and what leads into
    it); None when the text has fewer than two. A definition longer than a few pieces is cut
    again into runs of lines."""
    lines = _lines(text)
    starts: list[int] = []
    lead: int | None = None  # the first line of a run of decorators/comments/blanks
    for k, (_, line) in enumerate(lines):
        if line[:1].isspace() or not line.strip():
            lead = None  # blank lines and indented code go between pieces or inside one
            continue
        if _DEFINITION.match(line):
            starts.append(lead if lead is not None else k)
            lead = None
        elif _LEADING.match(line):
            lead = k if lead is None else lead
        else:
            lead = None
    if len(starts) < 2:
        return None
    if starts[0] != 0:
        starts.insert(0, 0)
    pieces: list[_Span] = []
    for first, stop in zip(starts, [*starts[1:], len(lines)]):
        start = lines[first][0]
        last = stop - 1
        while last > first and not lines[last][1].strip():
            last -= 1  # trailing blank lines go to the separator
        end = _line_end(*lines[last])
        if end - start > 4 * TOOL_PIECE_CHARS:
            pieces.extend(_Span(start + p.start, start + p.end, "tool_result") for p in _line_pieces(text[start:end], room))
        elif text[start:end].strip():
            room.take()
            pieces.append(_Span(start, end, "tool_result"))
    return pieces


def _tool_pieces(text: str, room: _Room) -> tuple[list[_Span], Flavour]:
    """A JSON array's items (grouped), so that dropping some leaves a valid array; source code
    by its top-level definitions; else runs of lines."""
    items = _json_array_items(text)
    if items is not None:
        return _grouped(items, TOOL_PIECE_CHARS // 2, room), "items"
    definitions = _code_pieces(text, room)
    if definitions is not None:
        return definitions, "lines"
    return _line_pieces(text, room), "lines"


def _split_tool_result(builder: _Builder, i: int, turn: Turn) -> None:
    """A step's tool output as pieces (array items or lines); its first piece protected."""
    others = _NonTextUnits(builder, i, _non_text_parts(turn))
    room = _Room(builder.max_units, len(builder.units))
    fields: list[_Field] = []
    first = True
    for part, text in _texts_of(turn):
        others.add_before(part)
        pieces, flavour = _tool_pieces(text, room)
        units = []
        for piece in pieces:
            units.append(builder.add_unit(text[piece.start : piece.end], "tool_result", first, i))
            first = False
        fields.append(_field_from_atoms(part, text, pieces, units, flavour))
    others.add_rest()
    builder.plans.append(_Plan(i, None, tuple(fields)))


def _segment_step(builder: _Builder, turns: Sequence[Turn], step: AgentStep) -> None:
    calls = []
    for i, turn in enumerate(turns):
        if turn.role == "assistant" and turn.calls:
            calls.append(turn.call_text)
            builder.whole(i, "\n".join(filter(None, (turn.text, turn.call_text))), "tool_call", True)
        elif turn.role == "tool" and not (step.live or turn.pinned or turn.opaque) and len(turn.text) >= step.min_chars:
            _split_tool_result(builder, i, turn)
        else:
            builder.whole(i, turn.text, "tool_result" if turn.role == "tool" else "turn", True)
    builder.query = "\n".join([step.task, *calls])


def segment(
    turns: Sequence[Turn],
    *,
    protect_system: bool = True,
    paragraph_min_chars: int = 400,
    sentence_max_chars: int = 2000,
    max_units: int | None = None,
    step: AgentStep | None = None,
) -> Segmentation:
    """Split turns into units; see the module docstring for what is protected, and
    ``AgentStep`` for the turns of an agent step. Raises TooManyUnits as soon as there would
    be more than ``max_units``."""
    if step is not None:
        builder = _Builder(max_units)
        _segment_step(builder, turns, step)
        return Segmentation(units=tuple(builder.units), query=builder.query, turns=tuple(turns), _plans=tuple(builder.plans))
    if paragraph_min_chars < 0:
        raise ValueError(f"paragraph_min_chars must be >= 0, got {paragraph_min_chars}")
    if sentence_max_chars < 1:
        raise ValueError(f"sentence_max_chars must be >= 1, got {sentence_max_chars}")
    builder = _Builder(max_units)
    exchanges = _tool_exchanges(turns)
    exchange_of = {member: owner for owner, members in exchanges.items() for member in members}
    exchange_unit: dict[int, int] = {}
    user_indices = [i for i, turn in enumerate(turns) if turn.role == "user"]
    last_user = user_indices[-1] if user_indices else None
    for i, turn in enumerate(turns):
        # The turn in progress (tool results the model is about to read, an assistant prefill)
        # is what the next answer continues from: dropping it would change the task.
        in_current_turn = last_user is not None and i > last_user
        owner = exchange_of.get(i)
        if owner is not None:
            if owner not in exchange_unit:
                text = _exchange_text(turns, exchanges[owner])
                pinned = any(turns[member].pinned for member in exchanges[owner])
                exchange_unit[owner] = builder.add_unit(text, "tool_exchange", in_current_turn or pinned, i)
            builder.plans.append(_Plan(i, exchange_unit[owner]))
            continue
        if turn.opaque:
            builder.whole(i, "", "other", True)  # a shape the adapter does not know travels untouched
            continue
        if turn.atomic and i != last_user:
            builder.whole(i, turn.text, "turn", in_current_turn or turn.pinned or turn.role == "system")
            continue
        if turn.role == "tool":
            # A result without its call is already invalid; pass it on for upstream to judge.
            builder.whole(i, turn.text, "tool_exchange", True)
            continue
        is_system = turn.role == "system"
        _segment_message(
            builder,
            i,
            turn,
            short_kind="system" if is_system else "turn",
            is_query=i == last_user,
            protected=(is_system and protect_system) or in_current_turn or turn.pinned,
            paragraph_min_chars=paragraph_min_chars,
            sentence_max_chars=sentence_max_chars,
        )
    return Segmentation(
        units=tuple(builder.units),
        query=builder.query,
        turns=tuple(turns),
        _plans=tuple(builder.plans),
    )


# --------------------------------------------------------------------------------------------
# Units -> edits


def _strongest(separators: Sequence[str]) -> str:
    """The separator that replaces a dropped stretch: the one with most line breaks wins, so
    dropping the end of one paragraph never glues the next paragraph to it."""
    return max(separators, key=lambda separator: separator.count("\n"))


def _stretches(kept_atoms: Sequence[bool]) -> list[tuple[int, int]]:
    """The runs of dropped atoms, as (first, last) positions."""
    runs: list[tuple[int, int]] = []
    for k, kept in enumerate(kept_atoms):
        if kept:
            continue
        if runs and runs[-1][1] == k - 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return runs


def _told(text_field: _Field, first: int, last: int, elide: Elide) -> str | None:
    """The text that stands for the dropped atoms first..last, or None."""
    original = [text_field.atoms[first][1]]
    for k in range(first, last):
        original.append(text_field.separators[k])
        original.append(text_field.atoms[k + 1][1])
    told = elide("".join(original), last - first + 1, text_field.flavour)
    if told is not None and text_field.flavour == "items":
        return json.dumps(told, ensure_ascii=False)  # one more item: the array stays valid JSON
    return told


def _rebuild_field(
    text_field: _Field, kept: Sequence[bool], elide: Elide | None = None, replaced: Mapping[int, str] | None = None
) -> str | None:
    """The field's text with dropped atoms removed (or, with ``elide``, each dropped stretch
    replaced by what it returns) and the atoms of units kept in part replaced by what is kept
    of them; None when nothing is left."""
    if not text_field.atoms:
        return text_field.leading + text_field.trailing
    kept_atoms = [kept[unit] for unit, _ in text_field.atoms]
    replaced = replaced or {}
    # (first atom position, last atom position, text): the kept atoms and the told stretches.
    pieces: list[tuple[int, int, str]] = [
        (k, k, replaced.get(unit, atom)) for k, (unit, atom) in enumerate(text_field.atoms) if kept_atoms[k]
    ]
    if elide is not None:
        for first, last in _stretches(kept_atoms):
            told = _told(text_field, first, last, elide)
            if told is not None:
                pieces.append((first, last, told))
        pieces.sort()
    if not pieces:
        return None
    out = [text_field.leading, pieces[0][2]]
    for previous, current in zip(pieces, pieces[1:]):
        out.append(_strongest(text_field.separators[previous[1] : current[0]]))
        out.append(current[2])
    out.append(text_field.trailing)
    return "".join(out)


def _edit_of(
    turn: Turn, plan: _Plan, kept: Sequence[bool], elide: Elide | None = None, replaced: Mapping[int, str] | None = None
) -> TurnEdit | None:
    atoms_kept = [kept[unit] for text_field in plan.fields for unit, _ in text_field.atoms]
    if all(atoms_kept) and not any(unit in (replaced or {}) for f in plan.fields for unit, _ in f.atoms):
        return None
    texts = tuple(
        (text_field.part_index, _rebuild_field(text_field, kept, elide, replaced)) for text_field in plan.fields
    )
    has_non_text = any(part is None for part in turn.parts)
    if turn.plain and texts[0][1] is None:
        return TurnEdit(dropped=True)
    if not (any(text is not None for _, text in texts) or has_non_text):
        return TurnEdit(dropped=True)
    return TurnEdit(texts=texts)


def _whole_turn_told(turn: Turn, elide: Elide) -> TurnEdit | None:
    """A turn dropped as one unit, each text part replaced by what ``elide`` tells of it; the
    rest of the turn (tool calls, images) stays as it came."""
    texts = tuple((k, elide(part, 1, "turn") or "") for k, part in enumerate(turn.parts) if part)
    return TurnEdit(texts=texts) if texts else None


def edits(
    segmentation: Segmentation,
    keep: Sequence[bool],
    elide: Elide | None = None,
    partial: Mapping[int, Sequence[bool]] | None = None,
) -> Edits:
    """Per turn: None when it is forwarded as it came, else what changes (protected units are
    always kept). A turn whose units were all dropped goes; a tool exchange goes as one.

    With ``elide`` each dropped stretch is told by the text it returns (lossless mode's
    retrievable markers, a count of lines cut from a tool result): a turn dropped whole then
    stays, its text replaced, so a tool call keeps its result and alternation holds.

    ``partial``: units kept in part (``pieces_of``), with a keep flag per piece."""
    units = segmentation.units
    if len(keep) != len(units):
        raise ValueError(f"keep has {len(keep)} flags for {len(units)} units")
    kept = [bool(flag) or unit.protected for flag, unit in zip(keep, units)]
    replaced: dict[int, str] = {}
    owned = atom_texts(segmentation) if partial else {}
    for unit, flags in (partial or {}).items():
        pieces = pieces_of(segmentation, unit, owned)
        if pieces is None or len(pieces.spans) != len(flags):
            raise ValueError(f"unit {unit} cannot be kept in part as decided")
        replaced[unit] = partial_text(pieces, flags, elide)
        kept[unit] = True
    result: list[TurnEdit | None] = []
    for plan in segmentation._plans:
        turn = segmentation.turns[plan.message_index]
        if plan.owner is not None:
            if kept[plan.owner]:
                result.append(None)
            elif elide is not None and elide.tells_turns:
                result.append(_whole_turn_told(turn, elide))
            else:
                result.append(TurnEdit(dropped=True))
        else:
            result.append(_edit_of(turn, plan, kept, elide, replaced))
    return tuple(result)


# --------------------------------------------------------------------------------------------
# A unit too large for what is left -> its pieces (aggressive budgets)

# The most pieces one unit is cut into for partial keeping: each is scored, so this bounds the
# extra scoring one descent costs.
MAX_PIECES = 64
# What stands for a stretch of pieces left out of a partly kept unit (lossy mode).
ELLIPSIS = "…"


@dataclass(frozen=True)
class Pieces:
    """A unit cut finer: its text, the pieces' spans in it, and how a gap between them is told."""

    text: str
    spans: tuple[tuple[int, int], ...]
    flavour: Flavour

    def texts(self) -> list[str]:
        return [self.text[start:end] for start, end in self.spans]


def atom_texts(segmentation: Segmentation) -> dict[int, list[str]]:
    """Unit -> the texts of the atoms it owns in the fields (one read of the plans)."""
    owned: dict[int, list[str]] = {}
    for plan in segmentation._plans:
        for text_field in plan.fields:
            for unit, text in text_field.atoms:
                owned.setdefault(unit, []).append(text)
    return owned


def pieces_of(segmentation: Segmentation, index: int, owned: Mapping[int, list[str]] | None = None) -> Pieces | None:
    """The unit's pieces when it can be kept in part: an unprotected unit that is one atom of
    one field (not a whole turn or tool exchange) and cuts into 2..MAX_PIECES pieces: sentences
    (lines where a sentence is long) for prose, items for a JSON array, definitions or lines
    for tool output and code. None otherwise. ``owned``: ``atom_texts`` of the segmentation,
    for a caller that asks about many units."""
    unit = segmentation.units[index]
    if unit.protected or unit.kind in ("turn", "tool_exchange", "tool_call", "query", "system", "other"):
        return None
    atoms = (owned if owned is not None else atom_texts(segmentation)).get(index, [])
    if len(atoms) != 1:
        return None
    text = atoms[0]
    room = _Room(MAX_PIECES, 0)
    flavour: Flavour = "text"
    try:
        if unit.kind in ("tool_result", "code", "json"):
            spans, flavour = _tool_pieces(text, room)
        else:
            spans = _sentences(text, _Span(0, len(text), "paragraph"), 400, room)
            if len(spans) < 2:
                spans = _line_pieces(text, room)
                flavour = "lines"
    except TooManyUnits:
        return None
    kept = tuple((s.start, s.end) for s in spans if text[s.start : s.end].strip())
    if not 2 <= len(kept) <= MAX_PIECES:
        return None
    return Pieces(text, kept, flavour)


def partial_text(pieces: Pieces, kept: Sequence[bool], elide: Elide | None = None) -> str:
    """The kept pieces in order, each stretch left out told by ``elide`` (lossless markers) or
    an ellipsis, so the reader knows text was cut."""
    out: list[str] = []
    gap: list[tuple[int, int]] = []

    def tell() -> None:
        if not gap:
            return
        original = pieces.text[gap[0][0] : gap[-1][1]]
        told = elide(original, len(gap), pieces.flavour) if elide is not None else None
        told = ELLIPSIS if told is None else told
        out.append(json.dumps(told, ensure_ascii=False) if pieces.flavour == "items" else told)
        gap.clear()

    for (start, end), keep in zip(pieces.spans, kept):
        if keep:
            tell()
            out.append(pieces.text[start:end])
        else:
            gap.append((start, end))
    tell()
    if pieces.flavour == "items":  # still JSON: items (and told gaps) comma-separated
        items = ", ".join(out)
        return f"[{items}]" if pieces.text.lstrip().startswith("[") else items
    return ("\n" if pieces.flavour == "lines" else " ").join(out)
