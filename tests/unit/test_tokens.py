from __future__ import annotations

import sys
from typing import Any

import pytest

from ccproxy.settings import Settings
from ccproxy.tokens import (
    ChatTemplateCounter,
    TiktokenCounter,
    content_text,
    counter_for,
    tiktoken_encoding,
    tokenizer_spec_for,
)

# The OpenAI cookbook's example ("How to count tokens with tiktoken"), with the prompt_tokens
# the API reported for it: 129 on gpt-3.5-turbo / gpt-4, 124 on gpt-4o.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def settings(**table: str) -> Settings:
    return Settings(model_tokenizers=table)


# --- resolution ------------------------------------------------------------------------------


def test_exact_name_wins_over_prefix_and_tiktoken() -> None:
    s = settings(**{"gpt-4o": "hf:exact", "gpt-4*": "hf:prefix"})
    assert tokenizer_spec_for("gpt-4o", s) == "hf:exact"


def test_longest_prefix_wins() -> None:
    s = settings(**{"llama-*": "hf:short", "llama-3.1-*": "hf:long"})
    assert tokenizer_spec_for("llama-3.1-8b", s) == "hf:long"
    assert tokenizer_spec_for("llama-2-7b", s) == "hf:short"


def test_prefix_wins_over_tiktoken_table() -> None:
    assert tokenizer_spec_for("gpt-4o-mini", settings(**{"gpt-4o*": "embedded"})) == "embedded"


def test_tiktoken_table_for_openai_names() -> None:
    s = settings()
    assert tokenizer_spec_for("gpt-4o", s) == "tiktoken:o200k_base"
    assert tokenizer_spec_for("gpt-4o-2024-08-06", s) == "tiktoken:o200k_base"
    assert tokenizer_spec_for("gpt-4", s) == "tiktoken:cl100k_base"
    assert tokenizer_spec_for("gpt-3.5-turbo", s) == "tiktoken:cl100k_base"
    assert tokenizer_spec_for("o1", s) == "tiktoken:o200k_base"


def test_unknown_and_missing_models_get_the_default() -> None:
    s = Settings(default_tokenizer="hf:some/model")
    assert tokenizer_spec_for("smollm2-upstream", s) == "hf:some/model"
    assert tokenizer_spec_for(None, s) == "hf:some/model"
    assert tokenizer_spec_for("smollm2-upstream", Settings()) == "embedded"


def test_unknown_spec_form_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        counter_for("m", settings(m="sentencepiece:x"))


# --- tiktoken offline --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ids"), [("cl100k_base", [15339, 1917]), ("o200k_base", [24912, 2375])]
)
def test_offline_encodings_give_known_ids(name: str, ids: list[int]) -> None:
    encoding = tiktoken_encoding(name)
    assert encoding.encode("hello world") == ids
    assert encoding.decode(encoding.encode("héllo 世界 👩‍💻")) == "héllo 世界 👩‍💻"
    assert "bpe_openai" not in sys.modules  # its native module is never loaded


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_copied_patterns_match_installed_tiktoken(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    reference = openai_public.ENCODING_CONSTRUCTORS[name]()
    encoding = tiktoken_encoding(name)
    assert encoding._pat_str == reference["pat_str"]
    assert encoding._special_tokens == reference["special_tokens"]


@pytest.mark.parametrize(("model", "expected"), [("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4o", 124)])
def test_cookbook_example_counts(model: str, expected: int) -> None:
    assert counter_for(model, settings()).count_prompt({"messages": COOKBOOK_MESSAGES}) == expected


def test_chat_overhead() -> None:
    counter = counter_for("gpt-4o", settings())
    one = {"messages": [{"role": "user", "content": "hello world"}]}
    assert counter.count_prompt(one) == 3 + 1 + 2 + 3  # framing, role, content, reply priming
    named = {"messages": [{"role": "user", "content": "hello world", "name": "bob"}]}
    assert counter.count_prompt(named) == counter.count_prompt(one) + 1 + counter(["bob"])[0]
    assert counter.count_prompt({"messages": []}) == 3


def test_content_tokens_have_no_special_tokens() -> None:
    counter = counter_for("gpt-4", settings())
    assert counter(["hello world", "", "<|endoftext|>"]) == [2, 0, 7]


def test_list_of_parts_counts_its_text_parts() -> None:
    counter = counter_for("gpt-4o", settings())
    plain = {"messages": [{"role": "user", "content": "hello world"}]}
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": " world"},
                ],
            }
        ]
    }
    assert counter.count_prompt(parts) == counter.count_prompt(plain)


def test_tool_calls_and_tools_add_tokens() -> None:
    counter = counter_for("gpt-4o", settings())
    call = {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    base = {"messages": [{"role": "assistant", "content": None}]}
    with_call = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    assert counter.count_prompt(with_call) == counter.count_prompt(base) + sum(
        counter(["get_weather", '{"city": "Paris"}'])
    )
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    assert counter.count_prompt({**base, "tools": [tool]}) > counter.count_prompt(base)


def test_counter_is_cached_per_spec() -> None:
    s = settings()
    first = counter_for("gpt-4o", s)
    assert isinstance(first, TiktokenCounter) and first.name == "tiktoken:o200k_base"
    assert counter_for("gpt-4o", s) is first
    assert counter_for("gpt-4o-mini", Settings()) is first  # same spec, shared counter


# --- chat-template counting (a stand-in tokenizer: no model load) -------------------------------


class _WordTokenizer:
    """One token per whitespace-separated word; the template frames each message with one token."""

    chat_template = "stand-in"

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def __call__(self, texts: Any, add_special_tokens: bool = True) -> dict[str, Any]:
        assert add_special_tokens is False
        if isinstance(texts, str):
            return {"input_ids": texts.split()}
        return {"input_ids": [t.split() for t in texts]}

    def apply_chat_template(self, messages: Any, tools: Any, add_generation_prompt: bool, tokenize: bool) -> str:
        self.seen.append((messages, tools))
        assert add_generation_prompt and not tokenize
        return " ".join(f"<m> {m['content']}" for m in messages) + " <gen>"


def test_chat_template_counter_flattens_parts() -> None:
    tokenizer = _WordTokenizer()
    counter = ChatTemplateCounter(tokenizer, "hf:stand-in")
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]},
            {"role": "assistant", "content": None},
        ]
    }
    assert counter.count_prompt(body) == 3 + 2 + 2 + 1
    messages, tools = tokenizer.seen[-1]
    assert [m["content"] for m in messages] == ["be brief", "hello world", ""]
    assert tools is None
    assert counter(["a b c", ""]) == [3, 0]


def test_content_text() -> None:
    assert content_text(None) == ""
    assert content_text("x") == "x"
    assert content_text([{"type": "text", "text": "a"}, {"type": "input_audio"}, {"type": "text", "text": "b"}]) == "ab"


def test_tokenizer_without_template_falls_back_to_openai_framing() -> None:
    tokenizer = _WordTokenizer()
    tokenizer.chat_template = None  # type: ignore[assignment]
    counter = ChatTemplateCounter(tokenizer, "hf:no-template")
    body = {"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]}
    assert counter.count_prompt(body) == 3 + 3 * 2 + 3
    assert tokenizer.seen == []



def test_a_fast_tokenizer_counts_from_many_threads_without_a_lock() -> None:
    """Counts go to the Rust core, which many threads may use at once: a megabyte counted in a
    thread never holds up a small count on the event loop (it waited on a lock before)."""
    import threading

    from ccproxy.tokens import default_counter

    counter = default_counter()
    texts = ["Hello world. <|im_start|>user hi", "." * 1000, "汉字 test", ""]
    wrapper = [len(ids) for ids in counter._tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert counter(texts) == wrapper
    errors: list[str] = []

    def count_many() -> None:
        try:
            for _ in range(20):
                counter(["x " * 5000])
        except Exception as exc:  # "Already borrowed" if the core were mutably borrowed
            errors.append(repr(exc))

    threads = [threading.Thread(target=count_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
