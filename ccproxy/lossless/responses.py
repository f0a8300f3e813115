"""Lossless mode on the Responses API: the tool, whole answers and the spliced stream."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from ccproxy.lossless.loop import Call, UsageAtTop
from ccproxy.lossless.markers import RETRIEVE_DESCRIPTION, RETRIEVE_PARAMETERS, RETRIEVE_TOOL
from ccproxy.protocol import sse_event
from ccproxy.usage_tap import chunk_of, count_of

TOOL = {
    "type": "function",
    "name": RETRIEVE_TOOL,
    "description": RETRIEVE_DESCRIPTION,
    "parameters": RETRIEVE_PARAMETERS,
    "strict": False,
}
# The events that end a response; held to the end of the last round.
_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _is_call(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "function_call"


def _is_ours(item: Any) -> bool:
    return _is_call(item) and item.get("name") == RETRIEVE_TOOL


def _output(answer: dict[str, Any]) -> list[Any]:
    output = answer.get("output")
    return output if isinstance(output, list) else []


def _input_items(body: dict[str, Any]) -> list[Any]:
    items = body.get("input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    return list(items) if isinstance(items, list) else []


class ResponsesDialect(UsageAtTop):
    def with_tool(self, body: dict[str, Any]) -> dict[str, Any]:
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        return {**body, "tools": [*tools, TOOL]}

    def calls(self, answer: dict[str, Any]) -> list[Call]:
        return [
            Call(str(item.get("call_id", "")), str(item.get("name", "")), str(item.get("arguments") or ""))
            for item in _output(answer)
            if _is_call(item)
        ]

    def continued(self, body: dict[str, Any], answer: dict[str, Any], results: Sequence[tuple[Call, str]]) -> dict[str, Any]:
        told = [{"type": "function_call_output", "call_id": call.id, "output": text} for call, text in results]
        return {**body, "input": [*_input_items(body), *_output(answer), *told]}

    def without_ours(self, answer: dict[str, Any]) -> dict[str, Any]:
        answer = copy.deepcopy(answer)
        answer["output"] = [item for item in _output(answer) if not _is_ours(item)]
        return answer

    def joined(self, earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
        return {**later, "output": [*_output(earlier), *_output(later)]}

    def prompt_tokens(self, usage: dict[str, Any]) -> int:
        return count_of(usage, "input_tokens") or 0

    def splicer(self) -> ResponsesSplicer:
        return ResponsesSplicer()


class ResponsesSplicer:
    """The first round's ``response.created``/``in_progress``, every output item but
    ccproxy's function calls (``output_index`` renumbered across rounds), one running
    ``sequence_number``; the final event held to the end, then given every round's visible
    items, the first round's id and every round's usage."""

    def __init__(self) -> None:
        self.sequence = 0
        self.visible_items: list[tuple[int, Any]] = []  # (client index, item) of every round
        self.visible = 0
        self.response_id: Any = None
        self.first_round = True
        self._start_round()

    def _start_round(self) -> None:
        self.index_of: dict[int, int | None] = {}  # upstream output_index -> the client's; None: ours
        self.items: dict[int, Any] = {}  # this round's finished items, by upstream index
        self.final: dict[str, Any] | None = None
        self.theirs = False

    def next_round(self) -> None:
        self.first_round = False
        self._start_round()

    def _out(self, payload: dict[str, Any], kind: str) -> bytes:
        if "sequence_number" in payload:
            payload = {**payload, "sequence_number": self.sequence}
            self.sequence += 1
        return sse_event(payload, event=kind)

    def read(self, event: bytes) -> list[bytes]:
        payload = chunk_of(event)
        kind = payload.get("type") if isinstance(payload, dict) else None
        if not isinstance(kind, str):
            return [event]
        if kind in ("response.created", "response.in_progress"):
            if not self.first_round:
                return []
            response = payload.get("response")
            if self.response_id is None and isinstance(response, dict):
                self.response_id = response.get("id")
            return [self._out(payload, kind)]
        if kind in _FINAL:
            self.final = payload
            return []
        index = payload.get("output_index")
        if not isinstance(index, int):
            return [self._out(payload, kind)]
        if kind == "response.output_item.added":
            item = payload.get("item")
            if _is_ours(item):
                self.index_of[index] = None
            else:
                self.theirs = self.theirs or _is_call(item)
                self.index_of[index] = self.visible
                self.visible += 1
        visible = self.index_of.get(index, index)
        if kind == "response.output_item.done":
            self.items[index] = payload.get("item")
            if visible is not None:
                self.visible_items.append((visible, payload.get("item")))
        if visible is None:
            return []
        return [self._out({**payload, "output_index": visible}, kind)]

    def _round_output(self) -> list[Any]:
        response = self.final.get("response") if self.final else None
        if isinstance(response, dict) and isinstance(response.get("output"), list) and response["output"]:
            return response["output"]
        return [self.items[i] for i in sorted(self.items)]

    def round_calls(self) -> tuple[list[Call], bool]:
        calls = ResponsesDialect().calls({"output": self._round_output()})
        return [call for call in calls if call.name == RETRIEVE_TOOL], self.theirs

    def round_answer(self) -> dict[str, Any]:
        return {"output": self._round_output()}

    def round_usage(self) -> dict[str, Any] | None:
        response = self.final.get("response") if self.final else None
        usage = response.get("usage") if isinstance(response, dict) else None
        return usage if isinstance(usage, dict) else None

    def finish(self, usage: dict[str, Any] | None) -> list[bytes]:
        if self.final is None:
            return []
        response = self.final.get("response")
        if not isinstance(response, dict):
            return [self._out(self.final, str(self.final["type"]))]
        response = {**response, "output": [item for _, item in sorted(self.visible_items, key=lambda pair: pair[0])]}
        if self.response_id is not None:
            response["id"] = self.response_id
        if usage is not None:
            response["usage"] = usage
        return [self._out({**self.final, "response": response}, str(self.final["type"]))]
