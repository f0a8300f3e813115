"""Agent loops: tool results of the turn in progress compressed against the task, each step once
and append-only, the newest step whole, every result still after its call — for chat,
Responses and Messages alike."""

from __future__ import annotations

import asyncio
import copy

from ccproxy.adapters import chat as chat_wire
from ccproxy.adapters import messages as messages_wire
from ccproxy.adapters import responses as responses_wire
from ccproxy.compression.history import HistoryMemo, turn_bounds
from ccproxy.compression.pipeline import compress_wire
from tests.unit.test_history import CountingScorer
from tests.unit.test_pipeline import overlap_score, plan, words

TASK = "Find where the zurich treaty parser fails and fix it."


def _output(step: int) -> str:
    """A long tool output: noise lines, and one line about the task."""
    lines = [f"src/module{step}/file{j}.py:{j}: unrelated noise token{step}x{j} " * 3 for j in range(60)]
    lines[17 + step] = f"src/treaty/parser.py:{step}: zurich treaty parser fails on dates"
    return "\n".join(lines)


def _chat_loop(steps: int) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": TASK}]
    for k in range(steps):
        call = {"id": f"c{k}", "type": "function", "function": {"name": "grep", "arguments": f'{{"q": "treaty {k}"}}'}}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"c{k}", "content": _output(k)})
    return messages


def _plan(**overrides):
    return plan(ratio=0.2, threshold_tokens=0, tool_result_min_chars=200, **overrides)


def _run(wire, payload, memo, score=overlap_score, **overrides):
    return asyncio.run(
        compress_wire(wire, payload, _plan(**overrides), count_tokens=words, score=score, memo=memo)
    )


def test_the_turn_in_progress_is_cut_into_steps() -> None:
    turns = chat_wire.parse(_chat_loop(3)).turns
    assert turn_bounds(turns) == [(0, len(turns))]  # without agent steps: one segment
    assert turn_bounds(turns, agent_steps=True) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_older_tool_results_are_cut_to_what_the_task_needs_and_the_newest_is_whole() -> None:
    messages = _chat_loop(4)
    result = _run(chat_wire.FORMAT, messages, HistoryMemo())
    forwarded = result.forwarded
    assert result.outcome == "compressed" and result.tokens_after < result.tokens_before
    assert forwarded[-1] == messages[-1]  # the newest result, about to be read: whole
    for k in range(3):
        sent = forwarded[3 + 2 * k]["content"]
        assert forwarded[3 + 2 * k]["tool_call_id"] == f"c{k}"  # still right after its call
        assert len(sent) < 0.5 * len(messages[3 + 2 * k]["content"])
        assert f"src/treaty/parser.py:{k}: zurich treaty parser fails" in sent  # the line that matters
        assert sent.startswith(_output(k).split("\n")[0][:40])  # the first piece always stays
    assert forwarded[:3] == messages[:3] and messages == _chat_loop(4)  # task and calls untouched


def test_each_step_is_decided_once_and_resent_byte_identical() -> None:
    memo = HistoryMemo()
    scorer = CountingScorer()
    sent = [_run(chat_wire.FORMAT, _chat_loop(n), memo, scorer).forwarded for n in range(1, 7)]
    for n in range(1, 6):
        previous, current = sent[n - 1], sent[n]
        # Everything before the previous request's newest step comes back unchanged...
        stable_prefix = len(previous) - 2
        assert current[:stable_prefix] == previous[:stable_prefix], f"step {n} rewrote an earlier one"
        # ...and that step, whole then, is compressed now (and from now on).
        assert len(current[stable_prefix + 1]["content"]) < len(previous[stable_prefix + 1]["content"])
    # Six requests, five steps decided: each once (the task's own segment has nothing to drop).
    assert len(scorer.calls) == 5
    assert all("treaty" in query and TASK in query for query in scorer.calls)  # task + the call's arguments


def test_the_newest_step_too_when_the_setting_says_so() -> None:
    messages = _chat_loop(2)
    result = _run(chat_wire.FORMAT, messages, HistoryMemo(), keep_newest_tool_result=False)
    assert len(result.forwarded[-1]["content"]) < 0.5 * len(messages[-1]["content"])


def test_short_results_and_requests_without_steps_are_left_alone() -> None:
    messages = _chat_loop(3)
    for message in messages[3::2]:
        message["content"] = "ok"
    result = _run(chat_wire.FORMAT, messages, HistoryMemo())
    assert result.forwarded == messages
    # No memo (``rescore``): the turn in progress stays whole, as before.
    rescored = asyncio.run(compress_wire(chat_wire.FORMAT, _chat_loop(3), _plan(), count_tokens=words, score=overlap_score))
    assert rescored.forwarded == _chat_loop(3)


def test_a_responses_agent_loop() -> None:
    items: list[dict] = [{"role": "user", "content": TASK}]
    for k in range(3):
        items.append({"type": "function_call", "call_id": f"c{k}", "name": "grep", "arguments": f'{{"q": "treaty {k}"}}'})
        items.append({"type": "function_call_output", "call_id": f"c{k}", "output": _output(k)})
    body = {"model": "m", "input": items}
    forwarded = _run(responses_wire.FORMAT, copy.deepcopy(body), HistoryMemo()).forwarded["input"]
    assert [i.get("call_id") for i in forwarded] == [i.get("call_id") for i in items]  # nothing orphaned
    assert forwarded[-1] == items[-1]
    assert len(forwarded[2]["output"]) < 0.5 * len(items[2]["output"])
    assert "src/treaty/parser.py:0: zurich treaty parser fails" in forwarded[2]["output"]


def test_a_messages_agent_loop_with_text_and_list_results() -> None:
    messages: list[dict] = [{"role": "user", "content": TASK}]
    for k in range(3):
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": f"Searching {k}."},
            {"type": "tool_use", "id": f"t{k}", "name": "grep", "input": {"q": f"treaty {k}"}},
        ]})
        content = _output(k) if k % 2 else [{"type": "text", "text": _output(k)}]
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{k}", "content": content}]})
    body = {"model": "claude", "max_tokens": 8, "messages": messages}
    forwarded = _run(messages_wire.FORMAT, copy.deepcopy(body), HistoryMemo()).forwarded["messages"]
    assert len(forwarded) == len(messages) and forwarded[-1] == messages[-1]
    first = forwarded[2]["content"][0]["content"][0]["text"]
    second = forwarded[4]["content"][0]["content"]
    assert len(first) < 0.5 * len(_output(0)) and "parser.py:0: zurich treaty" in first
    assert len(second) < 0.5 * len(_output(1)) and "parser.py:1: zurich treaty" in second


def test_a_json_array_result_keeps_whole_items_and_stays_valid_json() -> None:
    import json

    records = [{"id": k, "title": f"record {k} about unrelated noise " * 3} for k in range(40)]
    records[23]["title"] = "zurich treaty parser fails on dates"
    for indent in (None, 2):
        messages = _chat_loop(2)
        messages[3]["content"] = json.dumps(records, indent=indent)
        sent = _run(chat_wire.FORMAT, messages, HistoryMemo()).forwarded[3]["content"]
        kept = json.loads(sent)  # still one valid JSON array
        assert len(sent) < 0.5 * len(messages[3]["content"])
        assert kept[0] == records[0] and records[23] in kept  # the first piece, and the match
        assert all(record in records for record in kept)  # whole items only, none cut open
