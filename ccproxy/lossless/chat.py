"""Lossless mode on chat completions: the tool, whole answers and the spliced stream."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from ccproxy.lossless.loop import Call, UsageAtTop, is_ours
from ccproxy.lossless.markers import RETRIEVE_DESCRIPTION, RETRIEVE_PARAMETERS, RETRIEVE_TOOL
from ccproxy.protocol import SSE_DONE, sse_event, sse_fields
from ccproxy.usage_tap import chunk_of, count_of

TOOL = {
    "type": "function",
    "function": {"name": RETRIEVE_TOOL, "description": RETRIEVE_DESCRIPTION, "parameters": RETRIEVE_PARAMETERS},
}


def _message(answer: dict[str, Any]) -> dict[str, Any] | None:
    choices = answer.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        return message if isinstance(message, dict) else None
    return None


def _call_of(call: Any) -> Call | None:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return None
    function = call["function"]
    return Call(str(call.get("id", "")), str(function.get("name", "")), str(function.get("arguments") or ""))


class ChatDialect(UsageAtTop):
    def with_tool(self, body: dict[str, Any]) -> dict[str, Any]:
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        return {**body, "tools": [*tools, TOOL]}

    def calls(self, answer: dict[str, Any]) -> list[Call]:
        message = _message(answer)
        listed = message.get("tool_calls") if message else None
        return [c for c in map(_call_of, listed if isinstance(listed, list) else []) if c is not None]

    def continued(self, body: dict[str, Any], answer: dict[str, Any], results: Sequence[tuple[Call, str]]) -> dict[str, Any]:
        message = _message(answer) or {}
        asked = {
            "role": "assistant",
            "content": message.get("content") or None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call, _ in results
            ],
        }
        told = [{"role": "tool", "tool_call_id": call.id, "content": text} for call, text in results]
        return {**body, "messages": [*body["messages"], asked, *told]}

    def without_ours(self, answer: dict[str, Any]) -> dict[str, Any]:
        answer = copy.deepcopy(answer)
        message = _message(answer)
        if message is None:
            return answer
        theirs = [call for call in message.get("tool_calls") or [] if not (_call_of(call) and is_ours(_call_of(call)))]  # type: ignore[arg-type]
        if theirs:
            message["tool_calls"] = theirs
        else:
            message.pop("tool_calls", None)
            message["content"] = message.get("content") or ""
            if answer["choices"][0].get("finish_reason") == "tool_calls":
                answer["choices"][0]["finish_reason"] = "stop"
        return answer

    def joined(self, earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
        before, after = _message(earlier), _message(later)
        if before is None or after is None or not before.get("content"):
            return later
        later = copy.deepcopy(later)
        message = _message(later) or {}
        message["content"] = f"{before['content']}{after.get('content') or ''}"
        return later

    def prompt_tokens(self, usage: dict[str, Any]) -> int:
        return count_of(usage, "prompt_tokens") or 0

    def splicer(self) -> ChatSplicer:
        return ChatSplicer()


class ChatSplicer:
    """Chunks relayed as they come, but for ccproxy's tool-call deltas (dropped; the client's
    calls are renumbered from 0) and the round's end (the finish chunk, the usage chunk,
    ``[DONE]``: held)."""

    def __init__(self) -> None:
        self.next_round()

    def next_round(self) -> None:
        self.text: list[str] = []
        self.ours: dict[int, dict[str, str]] = {}  # upstream index -> id, name, arguments
        self.theirs = False
        self.index_is_ours: dict[int, bool] = {}
        self.finish_chunk: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        # Upstream tool-call index -> the client's (the client's calls only come in a last round).
        self.visible_index: dict[int, int] = {}

    def _tool_deltas(self, deltas: list[Any]) -> list[Any]:
        """The client's deltas, renumbered; ccproxy's are taken in."""
        kept = []
        for delta in deltas:
            if not isinstance(delta, dict) or not isinstance(delta.get("index"), int):
                kept.append(delta)
                continue
            index = delta["index"]
            function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
            if index not in self.index_is_ours:
                self.index_is_ours[index] = function.get("name") == RETRIEVE_TOOL
            if self.index_is_ours[index]:
                call = self.ours.setdefault(index, {"id": "", "name": RETRIEVE_TOOL, "arguments": ""})
                if isinstance(delta.get("id"), str):
                    call["id"] = delta["id"]
                if isinstance(function.get("arguments"), str):
                    call["arguments"] += function["arguments"]
                continue
            self.theirs = True
            visible = self.visible_index.setdefault(index, len(self.visible_index))
            kept.append({**delta, "index": visible})
        return kept

    def read(self, event: bytes) -> list[bytes]:
        chunk = chunk_of(event)
        if chunk is None:
            return [] if sse_fields(event).get("data") == "[DONE]" else [event]
        if not isinstance(chunk, dict):
            return [event]
        if isinstance(chunk.get("usage"), dict) and not chunk.get("choices"):
            self.usage = chunk["usage"]  # the usage chunk: sent at the end, every round's
            return []
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return [event]
        choice = choices[0]
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        changed = False
        if isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        if isinstance(delta.get("tool_calls"), list):
            kept = self._tool_deltas(delta["tool_calls"])
            if len(kept) != len(delta["tool_calls"]) or kept != delta["tool_calls"]:
                changed = True
                delta = {k: v for k, v in delta.items() if k != "tool_calls"}
                if kept:
                    delta["tool_calls"] = kept
        if choice.get("finish_reason") is not None:
            self.finish_chunk = {**chunk, "choices": [{**choice, "delta": delta}, *choices[1:]]}
            return []
        if not changed:
            return [event]
        if not delta:
            return []  # it held ccproxy's call only
        return [sse_event({**chunk, "choices": [{**choice, "delta": delta}, *choices[1:]]})]

    def round_calls(self) -> tuple[list[Call], bool]:
        calls = [Call(c["id"], c["name"], c["arguments"]) for _, c in sorted(self.ours.items())]
        return calls, self.theirs

    def round_answer(self) -> dict[str, Any]:
        calls = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in self.round_calls()[0]
        ]
        message = {"role": "assistant", "content": "".join(self.text) or None, "tool_calls": calls}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}

    def round_usage(self) -> dict[str, Any] | None:
        return self.usage

    def finish(self, usage: dict[str, Any] | None) -> list[bytes]:
        out: list[bytes] = []
        if self.finish_chunk is not None:
            chunk = self.finish_chunk
            choice = chunk["choices"][0]
            if self.ours and not self.theirs and choice.get("finish_reason") == "tool_calls":
                chunk = {**chunk, "choices": [{**choice, "finish_reason": "stop"}, *chunk["choices"][1:]]}
            out.append(sse_event(chunk))
        if usage is not None:
            out.append(sse_event({**self._usage_shell(), "usage": usage}))
        out.append(SSE_DONE)
        return out

    def _usage_shell(self) -> dict[str, Any]:
        shell = {k: v for k, v in (self.finish_chunk or {}).items() if k in ("id", "object", "created", "model", "system_fingerprint")}
        return {**shell, "choices": []}

