"""Messages -> units -> messages: what is atomic, what is protected, what a rebuild may do."""

from __future__ import annotations

import copy
import itertools
import json
import random
from typing import Any

import pytest

from ccproxy.compression.policy import allowance, select
from ccproxy.adapters.chat import rebuild_messages as rebuild
from ccproxy.adapters.chat import segment_messages as segment
from ccproxy.compression.units import Segmentation, Unit

Message = dict[str, Any]

CODE = "```python\ndef add(a, b):\n\n    # A blank line above must not split the block.\n    return a + b\n```"
JSON_BLOCK = '{\n  "name": "ccproxy",\n\n  "tags": ["proxy", "compression"]\n}'
TABLE = "| model | tokens |\n|-------|-------:|\n| small | 135 |\n| large | 7000 |"


def _prose(label: str, sentences: int) -> str:
    return " ".join(f"Sentence {k} of {label} says something." for k in range(sentences))


def _all(seg: Segmentation, flag: bool) -> list[bool]:
    return [flag] * len(seg.units)


def _keep_only(seg: Segmentation, predicate: Any) -> list[bool]:
    return [bool(predicate(unit)) for unit in seg.units]


def _kinds(seg: Segmentation) -> list[str]:
    return [unit.kind for unit in seg.units]


def _tool_call(call_id: str, name: str = "search", arguments: str = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _content_text(message: Message) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _assert_valid(original: list[Message], rebuilt: list[Message]) -> None:
    """What every rebuild must hold, whatever was kept."""
    # Tool calls and their results travel together.
    issued: dict[str, int] = {}
    for position, message in enumerate(rebuilt):
        for call in message.get("tool_calls") or []:
            issued[call["id"]] = position
        if message.get("role") == "tool":
            assert message["tool_call_id"] in issued, "a tool result lost its call"
    answered_in_input = {m["tool_call_id"] for m in original if m.get("role") == "tool"}
    answered = {m["tool_call_id"] for m in rebuilt if m.get("role") == "tool"}
    for call_id in issued:
        if call_id in answered_in_input:
            assert call_id in answered, "a tool call lost its result"
    # Nothing empty that was not empty before.
    for message in rebuilt:
        content = message.get("content")
        if content in ("", []):
            assert message in original
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "text" and part["text"] == "":
                    assert any(part in (m.get("content") or []) for m in original if isinstance(m.get("content"), list))
    # Messages come back in their original order, each from one original message.
    positions = []
    for message in rebuilt:
        candidates = [
            k
            for k, m in enumerate(original)
            if m.get("role") == message.get("role")
            and {key: v for key, v in m.items() if key != "content"}
            == {key: v for key, v in message.items() if key != "content"}
            and (k not in positions)
        ]
        assert candidates, "a rebuilt message has no original"
        positions.append(next(k for k in candidates if not positions or k > positions[-1]))
    assert positions == sorted(positions)


# --------------------------------------------------------------------------------------------
# Units


def test_short_messages_are_one_unit_each() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    seg = segment(messages)
    assert seg.units == (
        Unit(0, "Be brief.", "system", True, 0),
        Unit(1, "Hello there.", "turn", False, 1),
        Unit(2, "Hi! How can I help?", "turn", False, 2),
        Unit(3, "What is the capital of France?", "query", True, 3),
    )
    assert seg.query == "What is the capital of France?"


def test_long_messages_split_into_paragraphs_and_long_paragraphs_into_sentences() -> None:
    first, second = _prose("alpha", 4), _prose("beta", 4)
    long_paragraph = _prose("gamma", 40)
    messages = [
        {"role": "assistant", "content": f"{first}\n\n{second}\n\n{long_paragraph}"},
        {"role": "user", "content": "Summarise."},
    ]
    seg = segment(messages, paragraph_min_chars=100, sentence_max_chars=500)
    kinds = _kinds(seg)
    assert kinds[:2] == ["paragraph", "paragraph"]
    assert kinds[2:-1] == ["sentence"] * 40
    assert seg.units[0].text == first
    assert seg.units[2].text == "Sentence 0 of gamma says something."
    assert kinds[-1] == "query"


def test_a_sentence_still_too_long_is_cut_at_line_breaks() -> None:
    lines = [f"item {k} without any full stop" for k in range(30)]
    text = "\n".join(lines)
    messages = [{"role": "assistant", "content": text}, {"role": "user", "content": "Next?"}]
    seg = segment(messages, paragraph_min_chars=10, sentence_max_chars=100)
    assert [u.text for u in seg.units[:-1]] == lines


def test_code_json_and_tables_stay_whole_even_when_long() -> None:
    long_code = "```\n" + "\n\n".join(f"line {k}. Another sentence. More." for k in range(200)) + "\n```"
    messages = [
        {
            "role": "assistant",
            "content": f"{_prose('intro', 3)}\n\n{CODE}\n\n{JSON_BLOCK}\n\n{TABLE}\n\n{long_code}",
        },
        {"role": "user", "content": "Explain."},
    ]
    seg = segment(messages, paragraph_min_chars=50, sentence_max_chars=40)
    by_kind = {unit.kind: unit.text for unit in seg.units}
    assert by_kind["json"] == JSON_BLOCK
    assert by_kind["table"] == TABLE
    assert [u.text for u in seg.units if u.kind == "code"] == [CODE, long_code]
    assert _kinds(seg)[0] == "sentence"  # the intro is long for sentence_max_chars=40


def test_a_fence_may_follow_a_line_of_prose_directly() -> None:
    text = "Here is the fix:\n" + CODE + "\nIt adds two numbers and nothing else, promise."
    messages = [{"role": "assistant", "content": text}, {"role": "user", "content": "Thanks"}]
    seg = segment(messages, paragraph_min_chars=10)
    assert [(u.kind, u.text) for u in seg.units[:3]] == [
        ("paragraph", "Here is the fix:"),
        ("code", CODE),
        ("paragraph", "It adds two numbers and nothing else, promise."),
    ]


def test_an_unclosed_fence_runs_to_the_end() -> None:
    text = "Look:\n\n```\ncode\n\nmore code"
    messages = [{"role": "assistant", "content": text}, {"role": "user", "content": "ok"}]
    seg = segment(messages, paragraph_min_chars=5)
    assert [u.text for u in seg.units[:2]] == ["Look:", "```\ncode\n\nmore code"]


def test_inline_triple_backticks_do_not_open_a_fence() -> None:
    text = "Run ```make test``` first.\n\nThen read the report carefully."
    messages = [{"role": "assistant", "content": text}, {"role": "user", "content": "ok"}]
    seg = segment(messages, paragraph_min_chars=5)
    assert _kinds(seg)[:2] == ["paragraph", "paragraph"]


def test_text_in_brackets_is_not_json() -> None:
    text = "[1] Smith et al. found this.\n\n[2] Jones disagreed strongly."
    messages = [{"role": "assistant", "content": text}, {"role": "user", "content": "ok"}]
    seg = segment(messages, paragraph_min_chars=5)
    assert _kinds(seg)[:2] == ["paragraph", "paragraph"]


def test_json_may_span_blank_lines_but_broken_json_is_prose() -> None:
    text = f"{JSON_BLOCK}\n\n[1, 2,\n\nthis never closes.\n\n" + "[" * 50 + "\n\n{\"a\": 1} trailing words"
    messages = [{"role": "assistant", "content": text}, {"role": "user", "content": "ok"}]
    seg = segment(messages, paragraph_min_chars=5)
    assert [(u.kind, u.text) for u in seg.units[:-1]] == [
        ("json", JSON_BLOCK),
        ("paragraph", "[1, 2,"),
        ("paragraph", "this never closes."),
        ("paragraph", "[" * 50),
        ("paragraph", '{"a": 1} trailing words'),
    ]


def test_a_tool_call_and_its_results_are_one_unit() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                _tool_call("call_1", "weather", '{"city": "Paris"}'),
                _tool_call("call_2", "weather", '{"city": "Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Paris: 18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Rome: 24C"},
        {"role": "assistant", "content": "Paris 18C, Rome 24C."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    seg = segment(messages)
    exchanges = [u for u in seg.units if u.kind == "tool_exchange"]
    assert len(exchanges) == 1
    exchange = exchanges[0]
    assert exchange.message_index == 1 and not exchange.protected
    assert 'weather({"city": "Paris"})' in exchange.text and "Rome: 24C" in exchange.text

    dropped = rebuild(seg, _keep_only(seg, lambda u: u.kind != "tool_exchange"))
    assert [m["role"] for m in dropped] == ["user", "assistant", "user"]
    kept = rebuild(seg, _keep_only(seg, lambda u: u.kind == "tool_exchange"))
    assert kept == messages[1:4] + [messages[5]]


def test_reused_call_ids_pair_with_the_latest_call() -> None:
    # Some local servers number calls per turn, so "call_0" comes back in every exchange.
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": None, "tool_calls": [_tool_call("call_0")]},
        {"role": "tool", "tool_call_id": "call_0", "content": "result one"},
        {"role": "assistant", "content": None, "tool_calls": [_tool_call("call_0")]},
        {"role": "tool", "tool_call_id": "call_0", "content": "result two"},
        {"role": "user", "content": "second"},
    ]
    seg = segment(messages)
    exchanges = [u for u in seg.units if u.kind == "tool_exchange"]
    assert [u.message_index for u in exchanges] == [1, 3]
    assert "result one" in exchanges[0].text and "result two" in exchanges[1].text
    keep = _keep_only(seg, lambda u: u.index != exchanges[0].index)
    assert rebuild(seg, keep) == [messages[0], messages[3], messages[4], messages[5]]


def test_the_legacy_function_call_pairs_with_its_answer() -> None:
    messages = [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "function_call": {"name": "now", "arguments": "{}"}},
        {"role": "function", "name": "now", "content": "12:00"},
        {"role": "user", "content": "thanks, and the date?"},
    ]
    seg = segment(messages)
    assert _kinds(seg) == ["turn", "tool_exchange", "query"]
    assert rebuild(seg, [True, False, True]) == [messages[0], messages[3]]


def test_the_turn_in_progress_after_the_last_user_message_is_protected() -> None:
    messages = [
        {"role": "user", "content": "Find the bug."},
        {"role": "assistant", "content": None, "tool_calls": [_tool_call("c1", "read_file")]},
        {"role": "tool", "tool_call_id": "c1", "content": "def f(): return 1"},
        {"role": "assistant", "content": "The bug is"},
    ]
    seg = segment(messages)
    assert [(u.kind, u.protected) for u in seg.units] == [
        ("query", True),
        ("tool_exchange", True),
        ("turn", True),
    ]
    assert rebuild(seg, _all(seg, False)) == messages


def test_a_tool_result_without_its_call_is_passed_on_untouched() -> None:
    messages = [
        {"role": "tool", "tool_call_id": "ghost", "content": "orphan"},
        {"role": "user", "content": "hi"},
    ]
    seg = segment(messages)
    assert seg.units[0].kind == "tool_exchange" and seg.units[0].protected
    assert rebuild(seg, _all(seg, False)) == messages


def test_protected_parts_survive_keep_all_false() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [
        {"role": "system", "content": _prose("rules", 30)},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Look at this chart:"}, image]},
        {"role": "assistant", "content": "It shows growth."},
        {"role": "user", "content": "Why does it grow?"},
    ]
    seg = segment(messages)
    assert seg.units[0] == Unit(0, messages[0]["content"], "system", True, 0)  # never split
    rebuilt = rebuild(seg, _all(seg, False))
    assert rebuilt == [
        messages[0],
        messages[1],
        {"role": "user", "content": [image]},
        messages[4],
    ]


def test_system_messages_can_be_left_unprotected() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
    ]
    seg = segment(messages, protect_system=False)
    assert seg.units[0] == Unit(0, "Be brief.", "system", False, 0)
    assert rebuild(seg, _all(seg, False)) == [messages[1]]


def test_documents_then_a_question_make_the_last_paragraph_the_query() -> None:
    documents = [_prose(f"doc{k}", 5) for k in range(3)]
    question = "Which document mentions sentence 3?"
    messages = [{"role": "user", "content": "\n\n".join([*documents, question])}]
    seg = segment(messages)
    assert [(u.kind, u.protected) for u in seg.units] == [("paragraph", False)] * 3 + [("query", True)]
    assert seg.query == question
    assert rebuild(seg, [False, True, False, False]) == [
        {"role": "user", "content": documents[1] + "\n\n" + question}
    ]
    assert rebuild(seg, _all(seg, False)) == [{"role": "user", "content": question}]


def test_a_question_keeps_the_code_that_follows_it() -> None:
    document = _prose("manual", 12)
    question = "Why does this fail?"
    traceback = "```\nTraceback (most recent call last):\n  KeyError: 'x'\n```"
    content = f"{document}\n\n{question}\n\n{traceback}\n"
    seg = segment([{"role": "user", "content": content}])
    assert _kinds(seg) == ["paragraph", "query"]
    assert seg.query == f"{question}\n\n{traceback}"
    assert rebuild(seg, [False, False]) == [{"role": "user", "content": f"{question}\n\n{traceback}\n"}]


def test_a_single_long_paragraph_question_is_the_query_whole() -> None:
    question = _prose("question", 200)
    seg = segment([{"role": "user", "content": question}])
    assert seg.units == (Unit(0, question, "query", True, 0),)
    assert seg.query == question


def test_only_the_last_user_message_is_the_query() -> None:
    messages = [
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "new question"},
    ]
    seg = segment(messages)
    assert _kinds(seg) == ["turn", "turn", "query"]
    assert seg.query == "new question"


def test_without_a_user_message_there_is_no_query() -> None:
    seg = segment([{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}])
    assert seg.query == ""
    assert _kinds(seg) == ["system", "turn"]
    assert segment([]).units == ()


def test_content_part_lists_split_per_text_part_with_images_in_place() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}
    audio = {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}
    first = _prose("part1", 3) + "\n\n" + _prose("part1b", 3)
    second = _prose("part2", 3)
    message = {
        "role": "assistant",
        "content": [{"type": "text", "text": first}, image, {"type": "text", "text": second}, audio],
    }
    messages = [message, {"role": "user", "content": "ok"}]
    seg = segment(messages, paragraph_min_chars=100)
    assert [(u.kind, u.protected) for u in seg.units] == [
        ("paragraph", False),
        ("paragraph", False),
        ("other", True),
        ("paragraph", False),
        ("other", True),
        ("query", True),
    ]
    rebuilt = rebuild(seg, [False, True, False, False, False, True])
    assert rebuilt[0]["content"] == [
        {"type": "text", "text": _prose("part1b", 3)},
        image,
        audio,
    ]


def test_a_short_multi_part_message_is_one_turn() -> None:
    message = {
        "role": "user",
        "content": [{"type": "text", "text": "Compare"}, {"type": "text", "text": "these two."}],
    }
    messages = [message, {"role": "assistant", "content": "Done."}, {"role": "user", "content": "more"}]
    seg = segment(messages)
    assert seg.units[0] == Unit(0, "Compare\n\nthese two.", "turn", False, 0)
    assert rebuild(seg, [False, True, True]) == messages[1:]


def test_a_query_with_an_image_keeps_both() -> None:
    image = {"type": "image_url", "image_url": {"url": "u"}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]
    seg = segment(messages)
    assert [(u.kind, u.protected) for u in seg.units] == [("other", True), ("query", True)]
    assert seg.query == "What is this?"
    assert rebuild(seg, _all(seg, False)) == messages


def test_messages_whose_units_are_all_dropped_disappear() -> None:
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "\n\n".join(_prose(f"p{k}", 4) for k in range(3))},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "user", "content": "three"},
    ]
    seg = segment(messages, paragraph_min_chars=100)
    assert rebuild(seg, _all(seg, False)) == [messages[4]]


def test_other_keys_of_a_message_are_preserved() -> None:
    long_text = "\n\n".join(_prose(f"p{k}", 4) for k in range(3))
    message = {"role": "assistant", "name": "helper", "content": long_text, "x-custom": {"a": [1, 2]}}
    messages = [message, {"role": "user", "name": "bob", "content": "q"}]
    seg = segment(messages, paragraph_min_chars=100)
    rebuilt = rebuild(seg, [False, True, False, True])
    assert list(rebuilt[0]) == ["role", "name", "content", "x-custom"]
    assert rebuilt[0]["name"] == "helper" and rebuilt[0]["x-custom"] == {"a": [1, 2]}
    assert rebuilt[0]["content"] == _prose("p1", 4)
    assert rebuilt[1] == messages[1]


def test_dropping_the_end_of_a_paragraph_keeps_the_paragraph_break() -> None:
    paragraph_one = _prose("one", 30)
    paragraph_two = _prose("two", 3)
    messages = [
        {"role": "assistant", "content": f"{paragraph_one}\n\n{paragraph_two}"},
        {"role": "user", "content": "?"},
    ]
    seg = segment(messages, sentence_max_chars=200)
    keep = [unit.index == 0 or unit.text == paragraph_two or unit.protected for unit in seg.units]
    content = rebuild(seg, keep)[0]["content"]
    assert content == "Sentence 0 of one says something.\n\n" + paragraph_two


def test_rebuild_refuses_a_wrong_number_of_flags() -> None:
    seg = segment([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="keep has 2 flags for 1 units"):
        rebuild(seg, [True, True])


def test_segment_refuses_a_message_that_is_not_an_object() -> None:
    with pytest.raises(ValueError, match=r"messages\[1\] must be an object"):
        segment([{"role": "user", "content": "hi"}, "oops"])  # type: ignore[list-item]


def test_unknown_content_shapes_travel_untouched() -> None:
    messages = [{"role": "assistant", "content": {"weird": True}}, {"role": "user", "content": "q"}]
    seg = segment(messages)
    assert seg.units[0].kind == "other" and seg.units[0].protected
    assert rebuild(seg, _all(seg, False)) == messages


EDGE_CASES: list[list[Message]] = [
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": []}],
    [{"role": "user", "content": None}],
    [{"role": "assistant", "content": " " * 1000}, {"role": "user", "content": "q"}],
    [{"role": "assistant", "content": "a\r\n\r\nb  \r\n" * 200}, {"role": "user", "content": "q"}],
    [{"role": "assistant", "content": "\n\n\n" + _prose("x", 40) + "\n\n\n"}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "中文句子。" * 600}],
    [{"role": "assistant", "content": "中文句子。" * 600}, {"role": "user", "content": "q"}],
    [
        {"role": "assistant", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "x" * 900}]},
        {"role": "user", "content": "q"},
    ],
]


@pytest.mark.parametrize("messages", EDGE_CASES)
def test_edge_cases_rebuild_exactly_and_stay_valid(messages: list[Message]) -> None:
    before = copy.deepcopy(messages)
    seg = segment(messages, sentence_max_chars=300)
    assert rebuild(seg, _all(seg, True)) == messages
    for keep in ([False] * len(seg.units), [k % 2 == 0 for k in range(len(seg.units))]):
        _assert_valid(messages, rebuild(seg, keep))
    assert messages == before


# --------------------------------------------------------------------------------------------
# Random conversations: the invariants hold whatever is kept


def _random_block(rng: random.Random, ids: itertools.count[int]) -> str:
    tag = f"w{next(ids)}"
    choice = rng.random()
    if choice < 0.1:
        return f"```\n{tag} = 1\n\n{tag}. Not a sentence break. Nor here.\n```"
    if choice < 0.2:
        return json.dumps({"id": tag, "items": list(range(rng.randint(0, 5)))}, indent=rng.choice([None, 2]))
    if choice < 0.3:
        return f"| key | value |\n|---|---|\n| {tag} | 1. Two. Three. |"
    sentences = rng.choice([1, 3, 30])
    return " ".join(f"{tag}s{k} is a sentence here." for k in range(sentences))


def _random_text(rng: random.Random, ids: itertools.count[int]) -> str:
    if rng.random() < 0.4:
        return f"short w{next(ids)}"
    return "\n\n".join(_random_block(rng, ids) for _ in range(rng.randint(1, 6)))


def _random_content(rng: random.Random, ids: itertools.count[int]) -> Any:
    if rng.random() < 0.7:
        return _random_text(rng, ids)
    parts: list[dict[str, Any]] = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.3:
            parts.append({"type": "image_url", "image_url": {"url": f"https://img/{next(ids)}"}})
        else:
            parts.append({"type": "text", "text": _random_text(rng, ids)})
    return parts


def _random_conversation(rng: random.Random, ids: itertools.count[int]) -> list[Message]:
    messages: list[Message] = []
    if rng.random() < 0.7:
        messages.append({"role": "system", "content": _random_text(rng, ids)})
    for _ in range(rng.randint(0, 6)):
        kind = rng.random()
        if kind < 0.25:
            call_ids = [f"call_{next(ids)}" for _ in range(rng.randint(1, 3))]
            messages.append(
                {
                    "role": "assistant",
                    "content": rng.choice([None, _random_text(rng, ids)]),
                    "tool_calls": [_tool_call(call_id, arguments=f'{{"q": "{call_id}"}}') for call_id in call_ids],
                }
            )
            for call_id in call_ids:
                messages.append({"role": "tool", "tool_call_id": call_id, "content": _random_text(rng, ids)})
        else:
            role = rng.choice(["user", "assistant"])
            message: Message = {"role": role, "content": _random_content(rng, ids)}
            if rng.random() < 0.2:
                message["name"] = f"n{next(ids)}"
            messages.append(message)
    messages.append({"role": "user", "content": _random_content(rng, ids)})
    if rng.random() < 0.2:
        messages.append({"role": "assistant", "content": None, "tool_calls": [_tool_call("last")]})
        messages.append({"role": "tool", "tool_call_id": "last", "content": _random_text(rng, ids)})
    return messages


def _words(text: str) -> int:
    return len(text.split())


def test_random_conversations_keep_every_invariant() -> None:
    rng = random.Random(7)
    ids = itertools.count()
    for _ in range(300):
        messages = _random_conversation(rng, ids)
        before = copy.deepcopy(messages)
        options: dict[str, Any] = {
            "protect_system": rng.random() < 0.5,
            "paragraph_min_chars": rng.choice([0, 100, 400]),
            "sentence_max_chars": rng.choice([50, 300, 2000]),
        }
        seg = segment(messages, **options)
        assert [u.index for u in seg.units] == list(range(len(seg.units)))
        assert [u.message_index for u in seg.units] == sorted(u.message_index for u in seg.units)

        # Keeping everything changes nothing, twice over.
        same = rebuild(seg, _all(seg, True))
        assert same == messages
        assert segment(same, **options).units == seg.units
        assert rebuild(segment(same, **options), _all(seg, True)) == same

        # A budget from the policy, random scores, and the rebuild that follows.
        tokens = [_words(u.text) for u in seg.units]
        protected = [u.protected for u in seg.units]
        limit = allowance(tokens, protected, ratio=rng.random())
        keep = select(tokens, [rng.random() for _ in seg.units], protected, limit)
        rebuilt = rebuild(seg, keep)
        _assert_valid(messages, rebuilt)
        assert messages == before, "the input was mutated"

        kept_tokens = sum(t for t, k in zip(tokens, keep) if k)
        protected_tokens = sum(t for t, p in zip(tokens, protected) if p)
        assert kept_tokens <= protected_tokens + limit
        assert sum(_words(_content_text(m)) for m in rebuilt) <= kept_tokens

        rebuilt_text = "\x00".join(_content_text(m) for m in rebuilt)
        original_text = "\x00".join(_content_text(m) for m in messages)
        position = 0
        for unit, kept in zip(seg.units, keep):
            if not unit.text or original_text.count(unit.text) != 1:
                continue  # repeated or synthetic texts (tool exchanges) cannot be located
            if kept or unit.protected:
                # Kept units come back whole and in their order.
                found = rebuilt_text.find(unit.text, position)
                assert found >= 0, (unit, rebuilt_text)
                position = found + len(unit.text)
            elif unit.kind in ("code", "json", "table"):
                # Dropped atomic blocks leave nothing of themselves behind.
                assert unit.text not in rebuilt_text

        # Protected content is intact.
        assert seg.query in rebuilt_text
        for original in messages:
            if original.get("role") == "system" and options["protect_system"]:
                assert original in rebuilt
            for part in original.get("content") or [] if isinstance(original.get("content"), list) else []:
                if part.get("type") == "image_url":
                    assert any(part in (m.get("content") or []) for m in rebuilt if isinstance(m.get("content"), list))

        # A compressed result segments and rebuilds to itself.
        again = segment(rebuilt)
        assert rebuild(again, _all(again, True)) == rebuilt
