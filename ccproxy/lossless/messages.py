"""Lossless mode on Anthropic's Messages API: the tool, whole answers and the spliced stream."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from ccproxy.lossless.loop import Call, UsageAtTop
from ccproxy.lossless.markers import RETRIEVE_DESCRIPTION, RETRIEVE_PARAMETERS, RETRIEVE_TOOL
from ccproxy.protocol import sse_event
from ccproxy.usage_tap import chunk_of, count_of

TOOL = {"name": RETRIEVE_TOOL, "description": RETRIEVE_DESCRIPTION, "input_schema": RETRIEVE_PARAMETERS}
_PROMPT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _is_ours(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "tool_use" and block.get("name") == RETRIEVE_TOOL


def _blocks(answer: dict[str, Any]) -> list[Any]:
    content = answer.get("content")
    return content if isinstance(content, list) else []


class MessagesDialect(UsageAtTop):
    def with_tool(self, body: dict[str, Any]) -> dict[str, Any]:
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        return {**body, "tools": [*tools, TOOL]}

    def calls(self, answer: dict[str, Any]) -> list[Call]:
        return [
            Call(str(block.get("id", "")), str(block.get("name", "")), json.dumps(block.get("input") or {}))
            for block in _blocks(answer)
            if isinstance(block, dict) and block.get("type") == "tool_use"
        ]

    def continued(self, body: dict[str, Any], answer: dict[str, Any], results: Sequence[tuple[Call, str]]) -> dict[str, Any]:
        asked = {"role": "assistant", "content": _blocks(answer)}
        told = {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": text} for call, text in results],
        }
        return {**body, "messages": [*body["messages"], asked, told]}

    def without_ours(self, answer: dict[str, Any]) -> dict[str, Any]:
        answer = copy.deepcopy(answer)
        blocks = [block for block in _blocks(answer) if not _is_ours(block)]
        answer["content"] = blocks
        if answer.get("stop_reason") == "tool_use" and not any(b.get("type") == "tool_use" for b in blocks if isinstance(b, dict)):
            answer["stop_reason"] = "end_turn"
        return answer

    def joined(self, earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
        return {**later, "content": [*_blocks(earlier), *_blocks(later)]}

    def prompt_tokens(self, usage: dict[str, Any]) -> int:
        return sum(count_of(usage, name) or 0 for name in _PROMPT_FIELDS)

    def splicer(self) -> MessagesSplicer:
        return MessagesSplicer()


class MessagesSplicer:
    """``message_start`` of the first round, every content block but ccproxy's ``tool_use``
    ones (renumbered across rounds), ``ping``s; ``message_delta`` and ``message_stop`` held to
    the end, the delta's usage then every round's."""

    def __init__(self) -> None:
        self.first_round = True
        self.visible = 0  # content blocks the client has been given
        self.next_round()
        self.first_round = True

    def next_round(self) -> None:
        self.first_round = False
        self.blocks: dict[int, dict[str, Any]] = {}  # this round's blocks, by upstream index
        self.partial_json: dict[int, str] = {}
        self.index_of: dict[int, int | None] = {}  # upstream index -> the client's; None: ours
        self.start_usage: dict[str, Any] | None = None
        self.delta: dict[str, Any] | None = None
        self.theirs = False

    def _take(self, kind: str, payload: dict[str, Any]) -> None:
        index = payload.get("index")
        if not isinstance(index, int):
            return
        if kind == "content_block_start" and isinstance(payload.get("content_block"), dict):
            self.blocks[index] = copy.deepcopy(payload["content_block"])
            return
        block = self.blocks.get(index)
        delta = payload.get("delta")
        if kind != "content_block_delta" or block is None or not isinstance(delta, dict):
            return
        for name, field in (("text_delta", "text"), ("thinking_delta", "thinking"), ("signature_delta", "signature")):
            if delta.get("type") == name and isinstance(delta.get(field), str):
                block[field] = block.get(field, "") + delta[field]
        if delta.get("type") == "input_json_delta" and isinstance(delta.get("partial_json"), str):
            self.partial_json[index] = self.partial_json.get(index, "") + delta["partial_json"]

    def read(self, event: bytes) -> list[bytes]:
        payload = chunk_of(event)
        kind = payload.get("type") if isinstance(payload, dict) else None
        if not isinstance(kind, str):
            return [event]
        if kind == "message_start":
            message = payload.get("message")
            self.start_usage = message.get("usage") if isinstance(message, dict) else None
            return [event] if self.first_round else []
        if kind in ("message_delta", "message_stop"):
            if kind == "message_delta":
                self.delta = payload
            return []
        if kind.startswith("content_block_"):
            self._take(kind, payload)
            index = payload.get("index")
            if not isinstance(index, int):
                return [event]
            if kind == "content_block_start":
                if _is_ours(payload.get("content_block")):
                    self.index_of[index] = None
                else:
                    if payload.get("content_block", {}).get("type") == "tool_use":
                        self.theirs = True
                    self.index_of[index] = self.visible
                    self.visible += 1
            visible = self.index_of.get(index)
            if visible is None:
                return []
            return [event] if visible == index else [sse_event({**payload, "index": visible}, event=kind)]
        return [event]

    def round_calls(self) -> tuple[list[Call], bool]:
        calls = [
            Call(str(self.blocks[i].get("id", "")), RETRIEVE_TOOL, self.partial_json.get(i, "") or "{}")
            for i, visible in sorted(self.index_of.items())
            if visible is None and i in self.blocks
        ]
        return calls, self.theirs

    def round_answer(self) -> dict[str, Any]:
        content = []
        for index in sorted(self.blocks):
            block = dict(self.blocks[index])
            if block.get("type") == "tool_use":
                try:
                    block["input"] = json.loads(self.partial_json.get(index) or "{}")
                except ValueError:
                    block["input"] = {}
            content.append(block)
        return {"role": "assistant", "content": content}

    def round_usage(self) -> dict[str, Any] | None:
        """``message_start``'s usage with ``message_delta``'s on top (its counts are the final ones)."""
        usage = dict(self.start_usage or {})
        if self.delta is not None and isinstance(self.delta.get("usage"), dict):
            usage.update({k: v for k, v in self.delta["usage"].items() if v is not None})
        return usage or None

    def finish(self, usage: dict[str, Any] | None) -> list[bytes]:
        out: list[bytes] = []
        delta = self.delta
        if delta is not None:
            if any(v is None for v in self.index_of.values()) and not self.theirs:
                inner = delta.get("delta") if isinstance(delta.get("delta"), dict) else {}
                if inner.get("stop_reason") == "tool_use":
                    delta = {**delta, "delta": {**inner, "stop_reason": "end_turn"}}
            if usage is not None:
                delta = {**delta, "usage": usage}
            out.append(sse_event(delta, event="message_delta"))
        out.append(sse_event({"type": "message_stop"}, event="message_stop"))
        return out
