"""Lossless and citation markers, and lossy mode's counts, through the real compression path:
what a dropped stretch becomes, that its original is kept and comes back by id, that the same
history is forwarded byte for byte on every request, and that every API's request stays valid."""

from __future__ import annotations

import asyncio
import json
import re

from ccproxy.adapters import chat as chat_wire
from ccproxy.adapters import messages as messages_wire
from ccproxy.compression.history import HistoryMemo
from ccproxy.compression.pipeline import compress_wire
from ccproxy.lossless.loop import summed
from ccproxy.lossless.markers import Marking, lossy_note
from ccproxy.retrieval import RetrievalStore, stable_ref
from tests.unit.test_agent_steps import TASK, _chat_loop
from tests.unit.test_pipeline import overlap_score, plan, words

MARKER = re.compile(r"\[… (\d+) chars omitted · ccproxy_retrieve id=([0-9a-f]{24})\]")


def _store() -> RetrievalStore:
    return RetrievalStore(ttl_s=300, max_entries=1000, max_bytes=1 << 20)


def _rag_chat() -> list[dict]:
    paragraphs = [f"Paragraph {k} talks about unrelated topic number {k} with filler words." * 3 for k in range(12)]
    paragraphs[7] = "The zurich treaty was signed in 1921 by the delegates of nine nations in the old town hall."
    return [
        {"role": "system", "content": "Answer from the documents."},
        {"role": "user", "content": "\n\n".join(paragraphs) + "\n\nWhen was the zurich treaty signed?"},
    ]


def _compress(payload, marking, wire=chat_wire.FORMAT, memo=None, **plan_overrides):
    options = {"ratio": 0.2, "threshold_tokens": 0, **plan_overrides}
    return asyncio.run(
        compress_wire(wire, payload, plan(**options), count_tokens=words, score=overlap_score, memo=memo, elide=marking)
    )


def test_each_dropped_stretch_becomes_a_marker_whose_id_brings_the_original_back() -> None:
    store = _store()
    marking = Marking("lossless", "acct", store)
    messages = _rag_chat()
    result = _compress(messages, marking)
    sent = result.forwarded[1]["content"]
    markers = MARKER.findall(sent)
    assert result.outcome == "compressed" and markers and marking.made == len(markers)
    assert "1921" in sent  # what the question needs is kept as text
    for chars, ref in markers:
        original = store.get("acct", ref)
        assert original is not None and len(original) == int(chars)
        assert original in messages[1]["content"]  # an exact stretch of what was sent
        assert store.get("another-account", ref) is None
    # Every dropped word is in some marker's original: nothing is lost.
    kept_and_kept_away = sent + " ".join(store.get("acct", ref) or "" for _, ref in markers)
    for word in set(messages[1]["content"].split()):
        assert word in kept_and_kept_away


def test_markers_are_the_same_bytes_on_every_request() -> None:
    store = _store()
    first = _compress(_rag_chat(), Marking("lossless", "acct", store)).forwarded
    again = _compress(_rag_chat(), Marking("lossless", "acct", store)).forwarded
    assert json.dumps(first) == json.dumps(again)
    other = _compress(_rag_chat(), Marking("lossless", "other", store)).forwarded
    assert json.dumps(other) != json.dumps(first)  # ids are per account
    (_, ref), *_ = MARKER.findall(first[1]["content"])
    assert ref == stable_ref("acct", store.get("acct", ref) or "")


def test_citation_markers_point_at_the_retrieve_route() -> None:
    store = _store()
    result = _compress(_rag_chat(), Marking("citation", "acct", store))
    refs = re.findall(r"original: /v1/retrieve/([0-9a-f]{24})\]", result.forwarded[1]["content"])
    assert refs and all(store.get("acct", ref) for ref in refs)
    assert "ccproxy_retrieve" not in result.forwarded[1]["content"]


def test_lossy_mode_drops_prose_silently() -> None:
    result = _compress(_rag_chat(), Marking("lossy", "acct", _store()))
    assert result.outcome == "compressed" and "omitted" not in result.forwarded[1]["content"]


def test_a_text_too_large_to_keep_is_forwarded_not_lost() -> None:
    tiny = RetrievalStore(ttl_s=300, max_entries=1000, max_bytes=40)
    messages = _rag_chat()
    result = _compress(messages, Marking("lossless", "acct", tiny))
    sent = result.forwarded[1]["content"]
    for word in set(messages[1]["content"].split()):
        assert word in sent or any(word in (tiny.get("acct", ref) or "") for _, ref in MARKER.findall(sent))


def _agent_json_loop(steps: int) -> list[dict]:
    messages = _chat_loop(steps)
    rows = [{"path": f"src/mod{j}.py", "line": j, "text": f"unrelated noise {j} " * 6} for j in range(40)]
    rows[9] = {"path": "src/treaty/parser.py", "line": 9, "text": "zurich treaty parser fails on dates"}
    messages[3]["content"] = json.dumps(rows)
    return messages


def test_a_json_array_stays_valid_json_and_says_how_many_items_went() -> None:
    messages = _agent_json_loop(3)
    lossy = _compress(messages, Marking("lossy", "acct", _store()), memo=HistoryMemo(), tool_result_min_chars=200)
    items = json.loads(lossy.forwarded[3]["content"])
    notes = [item for item in items if isinstance(item, str)]
    rows = [item for item in items if isinstance(item, dict)]
    assert notes and all(re.fullmatch(r"\[… \d+ items? omitted\]", note) for note in notes)
    assert sum(int(note.split()[1]) for note in notes) + len(rows) == 40  # every item counted
    assert any("zurich" in row["text"] for row in rows)

    store = _store()
    lossless = _compress(messages, Marking("lossless", "acct", store), memo=HistoryMemo(), tool_result_min_chars=200)
    items = json.loads(lossless.forwarded[3]["content"])
    markers = [MARKER.fullmatch(item) for item in items if isinstance(item, str)]
    assert markers and all(markers)
    back = [json.loads(f"[{store.get('acct', m.group(2))}]") for m in markers if m]
    assert sum(len(b) for b in back) + sum(isinstance(i, dict) for i in items) == 40


def test_lines_of_tool_output_say_how_many_went() -> None:
    messages = _chat_loop(3)
    result = _compress(messages, Marking("lossy", "acct", _store()), memo=HistoryMemo(), tool_result_min_chars=200)
    sent = result.forwarded[3]["content"]
    counts = [int(n) for n in re.findall(r"\[… (\d+) lines? omitted\]", sent)]
    assert counts
    kept_lines = [line for line in sent.split("\n") if not line.startswith("[…")]
    assert sum(counts) + len(kept_lines) == len(messages[3]["content"].split("\n"))
    assert "zurich treaty parser" in sent and TASK


def test_a_tool_exchange_dropped_whole_keeps_its_call_and_its_result_becomes_a_marker() -> None:
    """History before the last user turn: a whole exchange is one unit. Lossless mode keeps the
    call and answers it with a marker, so every call still has its result."""
    messages = _rag_chat()[:1]
    for k in range(6):
        messages.append({"role": "user", "content": f"Look up topic {k}, unrelated filler question number {k}."})
        call = {"id": f"t{k}", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"k": k})}}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"t{k}", "content": f"Topic {k} result: filler words {k} " * 20})
        messages.append({"role": "assistant", "content": f"Topic {k} is filler."})
    messages.append({"role": "user", "content": "Which topic had result filler words 3?"})
    store = _store()
    forwarded = _compress(messages, Marking("lossless", "acct", store)).forwarded
    assert len(forwarded) == len(messages)  # no turn goes: each dropped one is told by a marker
    called = {c["id"] for m in forwarded if m.get("tool_calls") for c in m["tool_calls"]}
    answered = [m["tool_call_id"] for m in forwarded if m["role"] == "tool"]
    assert called == set(answered)
    told = [m["content"] for m in forwarded if m["role"] == "tool" and MARKER.fullmatch(m["content"])]
    assert told and all(store.get("acct", MARKER.fullmatch(t).group(2)) for t in told)  # type: ignore[union-attr]


def test_messages_tool_results_stay_paired_under_lossless_markers() -> None:
    body = {
        "model": "m", "max_tokens": 8, "system": "You are a coding agent.",
        "messages": [{"role": "user", "content": TASK}],
    }
    for k in range(3):
        body["messages"].append({"role": "assistant", "content": [{"type": "tool_use", "id": f"u{k}", "name": "grep", "input": {"q": k}}]})
        lines = [f"src/m{k}/f{j}.py: unrelated noise {j} " * 3 for j in range(60)]
        lines[20] = "src/treaty/parser.py: zurich treaty parser fails on dates"
        body["messages"].append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"u{k}", "content": "\n".join(lines)}]})
    store = _store()
    forwarded = _compress(body, Marking("lossless", "acct", store), wire=messages_wire.FORMAT, memo=HistoryMemo(),
                          tool_result_min_chars=200).forwarded
    assert [m["role"] for m in forwarded["messages"]] == [m["role"] for m in body["messages"]]
    result = forwarded["messages"][2]["content"][0]
    assert result["tool_use_id"] == "u0" and MARKER.search(result["content"])


def test_lossy_notes() -> None:
    assert lossy_note("a\nb\nc", "lines") == "[… 3 lines omitted]"
    assert lossy_note('{"a": 1}, {"b": 2}', "items") == "[… 2 items omitted]"
    assert lossy_note("prose", "text") is None


def test_usage_of_every_round_is_added_up_field_by_field() -> None:
    first = {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 10}}
    second = {"prompt_tokens": 150, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 90}, "tier": "x"}
    assert summed([first, None, second]) == {
        "prompt_tokens": 250, "completion_tokens": 12, "prompt_tokens_details": {"cached_tokens": 100}, "tier": "x",
    }
    assert summed([None]) is None


def test_keeping_again_restarts_the_ttl() -> None:
    now = [0.0]
    store = RetrievalStore(ttl_s=10, max_entries=10, max_bytes=1000, clock=lambda: now[0])
    ref = store.keep("a", "original text")
    now[0] = 8
    assert store.keep("a", "original text") == ref
    now[0] = 15
    assert store.get("a", ref) == "original text"  # 7 s after it was kept again
    now[0] = 19
    assert store.get("a", ref) is None


def test_source_code_is_cut_at_its_top_level_definitions() -> None:
    from ccproxy.compression.units import TOOL_PIECE_CHARS, _code_pieces, _NO_CAP

    source = "\n".join([
        "import os", "", "", "@cache", "def alpha(x):", "    return x", "", "",
        "# the beta class", "class Beta:", "    def method(self):", "        pass", "", "",
        "async def gamma():", "    await thing()", "",
    ])
    pieces = _code_pieces(source, _NO_CAP)
    assert pieces is not None
    texts = [source[p.start : p.end] for p in pieces]
    assert texts[0] == "import os"
    assert texts[1].startswith("@cache\ndef alpha")
    assert texts[2].startswith("# the beta class\nclass Beta:")
    assert texts[3] == "async def gamma():\n    await thing()" and len(texts) == 4
    assert _code_pieces("plain log line one\nplain log line two\n", _NO_CAP) is None
    long_body = "def big():\n" + "\n".join(f"    x{k} = {k}" for k in range(400)) + "\ndef small():\n    pass\n"
    cut = _code_pieces(long_body, _NO_CAP) or []
    assert len(cut) > 3 and all(p.end - p.start <= 4 * TOOL_PIECE_CHARS for p in cut)
