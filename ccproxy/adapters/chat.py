"""OpenAI chat completions <-> the neutral conversation: one turn per message.

A message's ``content`` is a string (one plain part) or a list of content parts (a text part is
text; image, audio, file parts are carried untouched). An assistant's ``tool_calls`` (or the
legacy ``function_call``) are the calls its turn issues; a ``tool`` message answers one by
``tool_call_id``, a legacy ``function`` message the call just before it. Rendering copies every
key but ``content`` unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from ccproxy.compression.conversation import Conversation, Edits, Role, Turn, WireFormat
from ccproxy.compression.units import Segmentation, edits, segment

SYSTEM_ROLES = frozenset({"system", "developer"})
WIRE = "chat"


def _role(message: dict[str, Any]) -> Role:
    role = message.get("role")
    if role in SYSTEM_ROLES:
        return "system"
    if role in ("tool", "function"):
        return "tool"
    if role in ("user", "assistant"):
        return role
    return "other"


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _calls(message: dict[str, Any], index: int) -> tuple[tuple[str, ...], str]:
    """The call ids an assistant message issues, and the ``name(arguments)`` lines of them."""
    calls = message.get("tool_calls")
    listed = [call for call in calls if isinstance(call, dict)] if isinstance(calls, list) else []
    # A call without a usable id still makes the message a tool exchange; its id matches nothing.
    ids = [call["id"] if isinstance(call.get("id"), str) else f"#{index}.{k}" for k, call in enumerate(listed)]
    functions = [call.get("function") for call in listed]
    if message.get("function_call"):
        ids.append(_legacy_call_id(index))
        functions.append(message["function_call"])
    if not ids and calls:
        ids.append(f"#{index}")  # ``tool_calls`` of a shape nobody can answer: an exchange of one
    lines = [
        f"{function.get('name', '')}({function.get('arguments', '')})"
        for function in functions
        if isinstance(function, dict)
    ]
    return tuple(ids), "\n".join(lines)


def _legacy_call_id(index: int) -> str:
    # The legacy functions API has no ids: the answer follows its call directly.
    return f"function@{index}"


def _turn(messages: Sequence[Any], index: int) -> Turn:
    message = messages[index]
    if not isinstance(message, dict):
        raise ValueError(f"messages[{index}] must be an object, not {type(message).__name__}")
    role = _role(message)
    content = message.get("content")
    if content is not None and not isinstance(content, (str, list)):
        return Turn(role, (), opaque=True, source=message)
    if isinstance(content, str):
        parts: tuple[str | None, ...] = (content,)
    elif isinstance(content, list):
        parts = tuple(part["text"] if _is_text_part(part) else None for part in content)
    else:
        parts = ()
    calls: tuple[str, ...] = ()
    call_text = ""
    answers = None
    if role == "assistant":
        calls, call_text = _calls(message, index)
    elif message.get("role") == "tool":
        answers = message.get("tool_call_id") if isinstance(message.get("tool_call_id"), str) else None
    elif message.get("role") == "function" and index > 0 and isinstance(messages[index - 1], dict):
        if messages[index - 1].get("function_call"):
            answers = _legacy_call_id(index - 1)
    return Turn(role, parts, plain=isinstance(content, str), calls=calls, call_text=call_text, answers=answers,
                source=message)


def parse(messages: Sequence[Any]) -> Conversation:
    turns = tuple(_turn(messages, i) for i in range(len(messages)))
    return Conversation(turns, chat_prefix=lambda end: {"messages": list(messages[:end])}, wire=WIRE)


def render(messages: Sequence[dict[str, Any]], changes: Edits) -> list[dict[str, Any]]:
    """The messages with the edits applied; an unchanged message is an equal copy."""
    if len(changes) != len(messages):
        raise ValueError(f"{len(changes)} edits for {len(messages)} messages")
    forwarded: list[dict[str, Any]] = []
    for message, edit in zip(messages, changes):
        if edit is None:
            forwarded.append(copy.deepcopy(message))
            continue
        if edit.dropped:
            continue
        texts = dict(edit.texts)
        content = message.get("content")
        if isinstance(content, str):
            new_content: Any = texts.get(0, content)
        else:
            new_content = []
            for k, part in enumerate(content or []):
                if k not in texts:
                    new_content.append(copy.deepcopy(part))
                elif texts[k] is not None:
                    new_content.append({**copy.deepcopy(part), "text": texts[k]})
        forwarded.append(
            {key: (new_content if key == "content" else copy.deepcopy(value)) for key, value in message.items()}
        )
    return forwarded


def segment_messages(messages: Sequence[Any], **options: Any) -> Segmentation:
    """``units.segment`` of chat messages (tests and benchmarks read units this way)."""
    return segment(parse(messages).turns, **options)


def rebuild_messages(segmentation: Segmentation, keep: Sequence[bool]) -> list[dict[str, Any]]:
    """The chat messages that keep the kept units of a ``segment_messages`` segmentation."""
    return render([turn.source for turn in segmentation.turns], edits(segmentation, keep))


FORMAT: WireFormat[Sequence[Any]] = WireFormat(WIRE, parse, render)  # type: ignore[arg-type]
