"""Anthropic's Messages API <-> the neutral conversation.

``system`` is a system turn. A message whose content is a string is one turn. A list of content
blocks is cut into slices: each ``tool_result`` block is a tool turn answering its
``tool_use_id`` (in a user message the results come first, then the user's own words, a user
turn of their own); the other blocks of a message form one turn, where ``text`` blocks are text
and every other block (image, document, thinking, tool_use, …) is carried untouched. An
assistant turn's ``tool_use`` blocks are the calls it issues, so a call and its result are one
unit.

Two rules of the API are kept here:
- **Cache breakpoints.** Everything at or before the last block that carries ``cache_control``
  (``tools``, then ``system``, then the messages, in that order) is pinned: the prefix the
  client asked the provider to cache is forwarded byte for byte, request after request.
- **Thinking.** A message holding a ``thinking`` or ``redacted_thinking`` block is atomic: kept
  whole, signatures and all, or (an earlier turn's) dropped whole, never shortened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ccproxy.compression.conversation import Conversation, Edits, Role, Turn, TurnEdit, WireFormat

WIRE = "messages"
_THINKING = frozenset({"thinking", "redacted_thinking"})


@dataclass(frozen=True)
class _Slice:
    """Where a turn lives: the message (None: ``system``) and its block indexes (None: the
    content is a string)."""

    message: int | None
    blocks: tuple[int, ...] | None


def _text_of(block: Any) -> str | None:
    if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
        return block["text"]
    return None


def _result_parts(block: dict[str, Any]) -> tuple[tuple[str | None, ...], bool] | None:
    content = block.get("content")
    if content is None:
        return (), False
    if isinstance(content, str):
        return (content,), True
    if isinstance(content, list):
        return tuple(_text_of(part) for part in content), False
    return None


def _breakpoint(body: dict[str, Any]) -> tuple[int, int] | None:
    """(message index, block index) of the last cache breakpoint; (-1, 0) when it lies in
    ``tools`` or ``system`` only; None when there is none."""
    last: tuple[int, int] | None = None
    for owner in (body.get("tools"), body.get("system")):
        if isinstance(owner, list) and any(isinstance(b, dict) and "cache_control" in b for b in owner):
            last = (-1, 0)
    messages = body.get("messages")
    for m, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for b, block in enumerate(content):
                if isinstance(block, dict) and "cache_control" in block:
                    last = (m, b)
    return last


def _slices(message: dict[str, Any], m: int) -> list[tuple[_Slice, list[Any]]]:
    """The message's slices, in order, with their blocks."""
    content = message.get("content")
    if not isinstance(content, list):
        return [(_Slice(m, None), [content])]
    slices: list[tuple[_Slice, list[Any]]] = []
    rest: list[int] = []
    for b, block in enumerate(content):
        if isinstance(block, dict) and block.get("type") == "tool_result":
            slices.append((_Slice(m, (b,)), [block]))
        else:
            rest.append(b)
    if rest:
        slices.append((_Slice(m, tuple(rest)), [content[b] for b in rest]))
    return slices


def _turn(role: Role, message: dict[str, Any], where: _Slice, blocks: list[Any], pinned: bool) -> Turn:
    source = {"role": message.get("role"), "content": blocks}
    if where.blocks is None:
        content = blocks[0]
        if not isinstance(content, str):
            return Turn("other", (), opaque=True, source=source)
        return Turn(role, (content,), plain=True, pinned=pinned, source=source)
    first = blocks[0]
    if len(blocks) == 1 and isinstance(first, dict) and first.get("type") == "tool_result":
        parsed = _result_parts(first)
        answers = first.get("tool_use_id")
        if parsed is None or not isinstance(answers, str):
            return Turn("other", (), opaque=True, source=source)
        return Turn("tool", parsed[0], plain=parsed[1], answers=answers, pinned=pinned, source=source)
    calls = [block for block in blocks if isinstance(block, dict) and block.get("type") == "tool_use"]
    call_ids = tuple(call["id"] for call in calls if isinstance(call.get("id"), str))
    call_text = "\n".join(
        f"{call.get('name', '')}({json.dumps(call.get('input'), ensure_ascii=False, default=repr)})" for call in calls
    )
    thinking = any(isinstance(block, dict) and block.get("type") in _THINKING for block in blocks)
    return Turn(
        role, tuple(_text_of(block) for block in blocks), calls=call_ids, call_text=call_text,
        atomic=thinking, pinned=pinned, source=source,
    )


def _layout(body: dict[str, Any]) -> list[tuple[_Slice, Turn]]:
    cut = _breakpoint(body)
    laid: list[tuple[_Slice, Turn]] = []
    system = body.get("system")
    if isinstance(system, str):
        laid.append((_Slice(None, None), Turn("system", (system,), plain=True, pinned=cut is not None, source=system)))
    elif isinstance(system, list):
        texts = tuple(_text_of(block) for block in system)
        laid.append((_Slice(None, tuple(range(len(system)))), Turn("system", texts, pinned=cut is not None, source=system)))
    messages = body.get("messages")
    for m, message in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict):
            laid.append((_Slice(m, None), Turn("other", (), opaque=True, source=message)))
            continue
        role: Role = "assistant" if message.get("role") == "assistant" else "user"
        for where, blocks in _slices(message, m):
            pinned = cut is not None and (m < cut[0] or (m == cut[0] and min(where.blocks or (0,)) <= cut[1]))
            laid.append((where, _turn(role, message, where, blocks, pinned)))
    return laid


def parse(body: dict[str, Any]) -> Conversation:
    turns = tuple(turn for _, turn in _layout(body))
    return Conversation(turns, chat_prefix=lambda end: {"messages": _chat_messages(turns[:end])}, wire=WIRE)


def _chat_messages(turns: tuple[Turn, ...]) -> list[dict[str, Any]]:
    return [
        {"role": "user" if turn.role == "other" else turn.role, "content": "\n".join(filter(None, (turn.text, turn.call_text)))}
        for turn in turns
    ]


def chat_view(body: dict[str, Any]) -> dict[str, Any]:
    """The request as a chat-completions body of the same text (system, turns, tool calls and
    results, the tools' schemas), for counting its prompt with a chat tokenizer."""
    tools = body.get("tools")
    chat_tools = [
        {"type": "function", "function": {"name": tool.get("name", ""), "description": tool.get("description", ""),
                                          "parameters": tool.get("input_schema", {})}}
        for tool in (tools if isinstance(tools, list) else [])
        if isinstance(tool, dict)
    ]
    view: dict[str, Any] = {"messages": _chat_messages(tuple(turn for _, turn in _layout(body)))}
    if chat_tools:
        view["tools"] = chat_tools
    return view


def _edited_list(parts: list[Any], texts: dict[int, str | None]) -> list[Any]:
    """Blocks with their new texts; a block whose text was dropped whole goes."""
    edited = []
    for k, part in enumerate(parts):
        if k not in texts:
            edited.append(part)
        elif texts[k] is not None:
            edited.append({**part, "text": texts[k]})
    return edited


def _edited_blocks(blocks: list[Any], edit: TurnEdit, is_result: bool) -> list[Any]:
    """A slice's blocks after ``edit``: a tool result's content, or the slice's own blocks."""
    texts = dict(edit.texts)
    if not is_result:
        return _edited_list(blocks, texts)
    block = blocks[0]
    content = block.get("content")
    if isinstance(content, str):
        return [{**block, "content": texts.get(0, content)}]
    return [{**block, "content": _edited_list(content, texts)}]


def render(body: dict[str, Any], changes: Edits) -> dict[str, Any]:
    """The body with the edits applied; a message left without blocks goes."""
    layout = _layout(body)
    if len(changes) != len(layout):
        raise ValueError(f"{len(changes)} edits for {len(layout)} turns")
    forwarded = dict(body)
    messages = body.get("messages") or []
    # message index -> block index -> the blocks that replace it ([] drops it)
    replaced: dict[int, dict[int, list[Any]]] = {}
    dropped_whole: set[int] = set()
    for (where, turn), edit in zip(layout, changes):
        if edit is None:
            continue
        if where.message is None:  # system: protected unless CCPROXY_COMPRESSION_PROTECT_SYSTEM is off
            system = body["system"]
            if edit.dropped:
                forwarded.pop("system", None)
            elif isinstance(system, str):
                forwarded["system"] = dict(edit.texts).get(0, system)
            else:
                forwarded["system"] = _edited_blocks(list(system), edit, is_result=False)
            continue
        if where.blocks is None:
            if edit.dropped:
                dropped_whole.add(where.message)
            else:
                replaced.setdefault(where.message, {})[-1] = [dict(edit.texts).get(0, messages[where.message]["content"])]
            continue
        content = messages[where.message]["content"]
        blocks = [content[b] for b in where.blocks]
        new_blocks = [] if edit.dropped else _edited_blocks(blocks, edit, is_result=turn.role == "tool")
        table = replaced.setdefault(where.message, {})
        for position, b in enumerate(where.blocks):
            table[b] = new_blocks if position == 0 else []
    out = []
    for m, message in enumerate(messages):
        if m in dropped_whole:
            continue
        if m not in replaced:
            out.append(message)
            continue
        table = replaced[m]
        if -1 in table:
            out.append({**message, "content": table[-1][0]})
            continue
        content: list[Any] = []
        for b, block in enumerate(message["content"]):
            content.extend(table[b] if b in table else [block])
        if content:
            out.append({**message, "content": content})
    forwarded["messages"] = out
    return forwarded


def _count(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    return len(messages) if isinstance(messages, list) else 0


FORMAT: WireFormat[dict[str, Any]] = WireFormat(WIRE, parse, render, count=_count)
