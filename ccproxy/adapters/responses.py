"""The OpenAI Responses API <-> the neutral conversation: one turn per input item.

``instructions`` is a system turn; ``input`` is one user turn when it is a string, else one turn
per item: ``message`` items by role (text parts ``input_text``/``output_text`` are text, others
untouched), a ``function_call`` (or ``custom_tool_call``) issues its ``call_id`` and the matching
``*_output`` answers it, so a call and its output are one unit. ``reasoning`` items, and every
item after one up to the next user message or tool output (the same response's output, which
the API wants back together with its reasoning), are pinned. Items of any other type
(``item_reference``, built-in tool calls, …) are opaque: forwarded untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ccproxy.compression.conversation import Conversation, Edits, Role, Turn, TurnEdit, WireFormat

WIRE = "responses"
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_ROLES: dict[Any, Role] = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_CALLS = {"function_call": "arguments", "custom_tool_call": "input"}
_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})


def _parts(content: Any) -> tuple[tuple[str | None, ...], bool] | None:
    """(the parts' texts, whether content is one plain string); None for an unknown shape."""
    if isinstance(content, str):
        return (content,), True
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        texts = tuple(
            part["text"] if part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str) else None
            for part in content
        )
        return texts, False
    return None


def _item_turn(item: Any, pinned: bool) -> Turn:
    if not isinstance(item, dict):
        return Turn("other", (), opaque=True, source=item)
    kind = item.get("type", "message")
    if kind == "message" and item.get("role") in _ROLES:
        parsed = _parts(item.get("content"))
        if parsed is None:
            return Turn("other", (), opaque=True, source=item)
        return Turn(_ROLES[item["role"]], parsed[0], plain=parsed[1], pinned=pinned, source=item)
    call_id = item.get("call_id")
    if kind in _CALLS and isinstance(call_id, str):
        call_text = f"{item.get('name', '')}({item.get(_CALLS[kind], '')})"
        return Turn("assistant", (), calls=(call_id,), call_text=call_text, pinned=pinned, source=item)
    if kind in _OUTPUTS and isinstance(call_id, str):
        parsed = _parts(item.get("output"))
        if parsed is None:
            return Turn("other", (), opaque=True, source=item)
        return Turn("tool", parsed[0], plain=parsed[1], answers=call_id, pinned=pinned, source=item)
    return Turn("other", (), opaque=True, source=item)


def _items(body: dict[str, Any]) -> list[Any]:
    raw = body.get("input")
    return raw if isinstance(raw, list) else []


def parse(body: dict[str, Any]) -> Conversation:
    turns: list[Turn] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        turns.append(Turn("system", (instructions,), plain=True, source={"instructions": instructions}))
    raw = body.get("input")
    if isinstance(raw, str):
        turns.append(Turn("user", (raw,), plain=True, source={"input": raw}))
    after_reasoning = False
    for item in _items(body):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "reasoning":
            after_reasoning = True
            turns.append(Turn("other", (), opaque=True, source=item))
            continue
        if kind in _OUTPUTS or (kind == "message" and item.get("role") == "user"):
            after_reasoning = False
        turns.append(_item_turn(item, pinned=after_reasoning))
    return Conversation(tuple(turns), chat_prefix=lambda end: _chat_prefix(body, turns, end), wire=WIRE)


def _chat_prefix(body: dict[str, Any], turns: Sequence[Turn], end: int) -> dict[str, Any]:
    """The first ``end`` turns as chat messages (the bridge's translation), for counting the
    prompt's framing. Each turn's source is an input item, or ``{"instructions": …}`` /
    ``{"input": …}`` for the body's two strings."""
    from ccproxy.responses.bridge import chat_request_from_responses  # the bridge imports protocol

    prefix: dict[str, Any] = {"model": body.get("model", ""), "input": []}
    for turn in turns[:end]:
        source = turn.source
        if isinstance(source, dict) and set(source) in ({"instructions"}, {"input"}):
            prefix.update(source)
        else:
            prefix["input"].append(source)
    try:
        return {"messages": chat_request_from_responses(prefix)["messages"]}
    except Exception:  # an item the bridge cannot express: no framing is set aside
        return {"messages": []}


def _edited_parts(content: Any, edit: TurnEdit) -> Any:
    texts = dict(edit.texts)
    if isinstance(content, str):
        return texts.get(0, content)
    parts = []
    for k, part in enumerate(content):
        if k not in texts:
            parts.append(part)
        elif texts[k] is not None:
            parts.append({**part, "text": texts[k]})
    return parts


def render(body: dict[str, Any], changes: Edits) -> dict[str, Any]:
    """The body with the edits applied; every other field and every untouched item as sent."""
    forwarded = dict(body)
    k = 0
    if isinstance(body.get("instructions"), str):
        edit = changes[k]
        if edit is not None:
            if edit.dropped:
                del forwarded["instructions"]
            else:
                forwarded["instructions"] = _edited_parts(body["instructions"], edit)
        k += 1
    if isinstance(body.get("input"), str):
        edit = changes[k]
        if edit is not None and not edit.dropped:
            forwarded["input"] = _edited_parts(body["input"], edit)
        return forwarded
    items = []
    for item, edit in zip(_items(body), changes[k:], strict=True):
        if edit is None:
            items.append(item)
        elif not edit.dropped:
            field = "content" if item.get("type", "message") == "message" else "output"
            items.append({**item, field: _edited_parts(item[field], edit)})
    forwarded["input"] = items
    return forwarded


FORMAT: WireFormat[dict[str, Any]] = WireFormat(WIRE, parse, render, count=lambda body: len(_items(body)))
