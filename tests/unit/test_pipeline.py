"""The compression pipeline's orchestration with a plain lexical scorer (no model)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from ccproxy.compression.gateway import ContextCompressor, compress_response
from ccproxy.adapters import chat as chat_wire
from ccproxy.compression.pipeline import CompressionPlan, compress_wire
from ccproxy.protocol import CompressionControl, ProxyError, compression_control
from ccproxy.settings import Settings


def words(texts: Sequence[str]) -> list[int]:
    return [len(text.split()) for text in texts]


async def overlap_score(query: str, units: Sequence[str], hint: object = None) -> list[float]:
    wanted = set(query.lower().split())
    return [float(len(wanted & set(unit.lower().split()))) for unit in units]


def rag_messages(n_documents: int = 10) -> list[dict]:
    documents = [f"Document {i}: " + " ".join(f"filler{i}x{j}" for j in range(40)) for i in range(n_documents)]
    documents[3] = "Document 3: the treaty of zurich was signed in 1859 " + " ".join(["filler"] * 32)
    question = "Question: when was the treaty of zurich signed?"
    return [
        {"role": "system", "content": "Answer from the documents."},
        {"role": "user", "content": "\n\n".join(documents + [question])},
    ]


def plan(**overrides) -> CompressionPlan:
    values = dict(enabled=True, ratio=0.2, budget_tokens=None, threshold_tokens=100, protect_system=True)
    values.update(overrides)
    return CompressionPlan(**values)


def compress_messages(messages, compression_plan, **options):
    """The whole request decided against its question (no memo: ``rescore``)."""
    return compress_wire(chat_wire.FORMAT, messages, compression_plan, **options)


def run(messages, compression_plan):
    return asyncio.run(compress_messages(messages, compression_plan, count_tokens=words, score=overlap_score))


def test_keeps_the_relevant_document_the_question_and_the_system_prompt() -> None:
    messages = rag_messages()
    result = run(messages, plan())
    assert result.outcome == "compressed"
    text = result.forwarded[1]["content"]
    assert "treaty of zurich was signed in 1859" in text
    assert text.endswith("Question: when was the treaty of zurich signed?")
    assert result.forwarded[0] == messages[0]
    assert result.tokens_after < result.tokens_before
    kept_unprotected = sum(u.kept_tokens for u in result.units if not u.protected)
    unprotected = sum(u.tokens for u in result.units if not u.protected)
    assert kept_unprotected <= 0.2 * unprotected
    assert all(u.score is None for u in result.units if u.protected)
    assert messages == rag_messages()  # the input is not modified


def test_budget_caps_the_whole_context() -> None:
    result = run(rag_messages(), plan(ratio=None, budget_tokens=120))
    assert result.tokens_after <= 120


class FramedWords:
    """Words per text, and a whole prompt as its words plus 4 per message and 1 per paragraph
    break (the kind of framing a chat template adds around the units)."""

    def __call__(self, texts: Sequence[str]) -> list[int]:
        return words(texts)

    def count_prompt(self, body: dict) -> int:
        messages = body["messages"]
        return sum(len(m["content"].split()) + 4 + m["content"].count("\n\n") for m in messages)


@pytest.mark.parametrize("history", ["rescore", "stable"])
def test_a_budget_caps_the_billed_prompt_framing_included(history: str) -> None:
    counter = FramedWords()
    compressor = ContextCompressor(overlap_score, Settings(compression_history=history))
    messages = rag_messages() + [{"role": "assistant", "content": "1859."}, rag_messages()[1]]
    for chat in (rag_messages(), messages):
        # 140: the units alone could fill it with three documents, whose framing would not fit.
        budget = 140
        result = asyncio.run(compressor.compress(chat, plan(ratio=None, budget_tokens=budget), counter))
        assert result.outcome == "compressed"
        billed = counter.count_prompt({"messages": result.forwarded})
        assert billed <= budget


@pytest.mark.parametrize(
    ("overrides", "outcome"),
    [({"enabled": False}, "disabled"), ({"threshold_tokens": 100_000}, "below_threshold")],
)
def test_skips_leave_messages_untouched(overrides: dict, outcome: str) -> None:
    messages = rag_messages()
    result = run(messages, plan(**overrides))
    assert result.outcome == outcome
    assert result.forwarded is messages
    assert result.tokens_before == result.tokens_after


def test_a_failing_scorer_fails_open_with_the_original_messages() -> None:
    async def broken(query: str, units: Sequence[str], hint: object = None) -> list[float]:
        raise MemoryError("CUDA out of memory")

    compressor = ContextCompressor(broken, Settings(compression_threshold_tokens=10))
    messages = rag_messages()
    result = asyncio.run(compressor.compress_or_original(messages, compressor.plan(CompressionControl()), words))
    assert result.outcome == "failed"
    assert result.forwarded is messages


def test_a_slow_scorer_times_out_and_fails_open() -> None:
    async def slow(query: str, units: Sequence[str], hint: object = None) -> list[float]:
        await asyncio.sleep(5)
        return [0.0] * len(units)

    settings = Settings(compression_threshold_tokens=10, compressor_timeout_s=0.05)
    compressor = ContextCompressor(slow, settings)
    result = asyncio.run(compressor.compress_or_original(rag_messages(), compressor.plan(CompressionControl()), words))
    assert result.outcome == "failed"


def test_compress_response_adds_up() -> None:
    result = run(rag_messages(), plan())
    body = compress_response(result)
    assert body["tokens_saved"] == result.tokens_saved
    assert sum(u["tokens"] for u in body["units"] if u["kept"]) == body["tokens_after"]


def test_server_defaults_fill_what_the_caller_left_out() -> None:
    compressor = ContextCompressor(overlap_score, Settings(compression_ratio=0.3))
    assert compressor.plan(CompressionControl()).ratio == 0.3
    chosen = compressor.plan(CompressionControl(enabled=False, budget_tokens=500))
    assert (chosen.enabled, chosen.ratio, chosen.budget_tokens) == (False, None, 500)


def test_compression_control_reads_headers_over_the_body_field_and_strips_it() -> None:
    body = {"model": "m", "messages": [], "ccproxy": {"compression": "on", "ratio": 0.5, "budget": 900}}
    control, forwarded = compression_control({"X-Compression-Ratio": "0.25", "X-Compression": "OFF"}, body)
    assert control == CompressionControl(enabled=False, ratio=0.25, budget_tokens=900)
    assert forwarded == {"model": "m", "messages": []}


@pytest.mark.parametrize(
    ("headers", "field", "param"),
    [
        ({"X-Compression": "maybe"}, None, "x-compression"),
        ({"X-Compression-Ratio": "0"}, None, "x-compression-ratio"),
        ({"X-Compression-Ratio": "1.5"}, None, "x-compression-ratio"),
        ({"X-Compression-Budget": "-3"}, None, "x-compression-budget"),
        ({}, {"budget": 2.5}, "ccproxy.budget"),
        ({}, {"ratio": "lots"}, "ccproxy.ratio"),
        ({}, {"strength": 3}, "ccproxy"),
        ({}, "on", "ccproxy"),
    ],
)
def test_bad_compression_controls_are_400(headers: dict, field: object, param: str) -> None:
    body = {"model": "m", "messages": []} if field is None else {"model": "m", "messages": [], "ccproxy": field}
    with pytest.raises(ProxyError) as caught:
        compression_control(headers, body)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_a_request_without_question_text_is_forwarded_whole() -> None:
    """No user text to rank against (an image-only turn): scoring would rank noise."""

    async def must_not_score(query: str, units: Sequence[str], hint: object = None) -> list[float]:
        raise AssertionError("scored without a question")

    documents = rag_messages()[1]["content"].rsplit("\n\n", 1)[0]
    messages = [
        {"role": "user", "content": documents},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
    ]
    result = asyncio.run(compress_messages(messages, plan(), count_tokens=words, score=must_not_score))
    assert result.outcome == "no_query" and result.forwarded == messages
