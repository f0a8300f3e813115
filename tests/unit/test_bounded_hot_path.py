"""The request path's CPU work is bounded: linear segmentation, caps checked before segmenting,
heavy work off the event loop, and no segmentation at all where nothing will be compressed."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Sequence

import pytest

from ccproxy.compression.bounds import SizeCaps, measure
from ccproxy.compression.gateway import ContextCompressor
from ccproxy.compression.offload import HeavyWork
from ccproxy.adapters.chat import parse
from ccproxy.adapters.chat import segment_messages as segment
from ccproxy.compression.units import _SENTENCE_END, TooManyUnits, _split_at
from ccproxy.protocol import CompressionControl
from ccproxy.settings import Settings

# The pattern before the fix, kept to prove the new one cuts text at exactly the same places.
_OLD_SENTENCE_END = re.compile(
    r"(?:[.!?\u2026]+[\"'\u201d\u2019)\]]*(\s+))|(?:[\u3002\uff01\uff1f]+[\u300d\u300f\u201d\u2019)]*(\s*))"
)


def words(texts: Sequence[str]) -> list[int]:
    return [len(text.split()) for text in texts]


async def overlap_score(query: str, units: Sequence[str], hint: object = None) -> list[float]:
    wanted = set(query.lower().split())
    return [float(len(wanted & set(unit.lower().split()))) for unit in units]


async def must_not_score(query: str, units: Sequence[str], hint: object = None) -> list[float]:
    raise AssertionError("the scorer was called")


def _cuts(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in _split_at(text, 0, len(text), pattern)]


@pytest.mark.parametrize(
    "text",
    [
        "One. Two! Three? Four… Five.\" Six.) Seven",
        "Wait... what?! Really?!  Yes.\n\nNext.",
        "句子一。句子二！句子三？」后面 English. More",
        "a.b.c. d..e .f",
        "。. ! 。」x ?\u201d y",
        "Ends with a stop.",
        "..) ...) .\"\u201d z",
    ],
)
def test_sentence_cuts_equal_the_old_pattern(text: str) -> None:
    assert _cuts(_SENTENCE_END, text) == _cuts(_OLD_SENTENCE_END, text)


def test_sentence_cuts_equal_the_old_pattern_on_random_punctuation() -> None:
    import random

    rng = random.Random(7)
    alphabet = ".!?…。！？」\"')] \n\tab"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        assert _cuts(_SENTENCE_END, text) == _cuts(_OLD_SENTENCE_END, text), repr(text)


@pytest.mark.parametrize("run", [".", "!", "?", "…", "。", "!?", ".)", '."', "?!。"])
def test_sentence_splitting_is_linear_on_runs_of_punctuation(run: str) -> None:
    # 32 KB of "." took ~11 s with the old pattern; 256 KB must take well under a second.
    text = "x " + run * (256_000 // len(run))
    started = time.perf_counter()
    _cuts(_SENTENCE_END, text)
    assert time.perf_counter() - started < 1.0


def test_segmentation_of_a_long_run_of_dots_is_fast() -> None:
    messages = [{"role": "user", "content": "." * 200_000 + "\n\nWhat is this?"}]
    started = time.perf_counter()
    segment(messages)
    assert time.perf_counter() - started < 2.0


def test_segmentation_stops_at_the_unit_cap() -> None:
    messages = [{"role": "user", "content": "a\n\n" * 50_000 + "Which one?"}]
    with pytest.raises(TooManyUnits):
        segment(messages, max_units=1000)
    assert len(segment(messages[:1], max_units=None).units) > 1000


def test_sentence_splitting_stops_at_the_unit_cap_not_after(monkeypatch: pytest.MonkeyPatch) -> None:
    import ccproxy.compression.units as units

    made = 0
    real_span = units._Span

    def counting_span(*args: object) -> object:
        nonlocal made
        made += 1
        return real_span(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(units, "_Span", counting_span)
    one_paragraph = "Short one. " * 150_000 + "\n\nWhich?"
    with pytest.raises(TooManyUnits):
        segment([{"role": "user", "content": one_paragraph}], max_units=1000)
    assert made < 5000  # ~1,000 sentences cut, not 150,000


def test_many_non_text_parts_segment_in_linear_time() -> None:
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}] * 40_000
    parts.append({"type": "text", "text": "x " * 300})
    started = time.perf_counter()
    seg = segment([{"role": "assistant", "content": parts}, {"role": "user", "content": "q"}])
    assert len(seg.units) >= 40_000
    assert time.perf_counter() - started < 2.0


CAPS = SizeCaps(max_chars=1000, max_messages=10, max_parts=20, max_units=100, max_lines=50)


def test_measure_names_the_first_cap_crossed() -> None:
    assert measure(parse([{"role": "user", "content": "x" * 1000}]).turns, CAPS).over_cap is None
    assert measure(parse([{"role": "user", "content": "x" * 1001}]).turns, CAPS).over_cap == "chars"
    assert measure(parse([{"role": "user", "content": "x"}] * 11).turns, CAPS).over_cap == "messages"
    parts = [{"type": "text", "text": "x"}] * 21
    assert measure(parse([{"role": "user", "content": parts}]).turns, CAPS).over_cap == "parts"
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "y" * 2000}}
    assert measure(parse([{"role": "assistant", "content": None, "tool_calls": [call]}]).turns, CAPS).over_cap == "chars"
    assert measure(parse([{"role": "user", "content": "\n" * 51}]).turns, CAPS).over_cap == "lines"
    assert measure(parse([{"role": "user", "content": [{"type": "text", "text": "\n" * 50}]}]).turns, CAPS).over_cap is None


def test_measure_counts_what_the_segmenter_reads() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": "de"},
    ]
    size = measure(parse(messages).turns, CAPS)
    assert (size.messages, size.parts, size.chars, size.lines, size.over_cap) == (2, 2, 5, 0, None)


def _compressor(**settings: object) -> ContextCompressor:
    values: dict[str, object] = {"compression_threshold_tokens": 10, "compression_history": "rescore"}
    values.update(settings)
    return ContextCompressor(overlap_score, Settings(**values))


def _rag(n: int = 8) -> list[dict[str, str]]:
    documents = [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(60)) for i in range(n)]
    return [{"role": "user", "content": "\n\n".join([*documents, "Which document mentions w3x5?"])}]


@pytest.mark.parametrize("history", ["rescore", "stable"])
def test_over_a_cap_the_request_goes_untouched_without_segmenting(history: str) -> None:
    compressor = _compressor(compression_max_chars=1000, compression_history=history)
    compressor._score = must_not_score  # type: ignore[assignment]
    messages = _rag()
    result = asyncio.run(compressor.compress(messages, compressor.plan(CompressionControl()), words))
    assert result.outcome == "too_large"
    assert result.forwarded is messages


@pytest.mark.parametrize("history", ["rescore", "stable"])
def test_over_the_unit_cap_the_request_goes_untouched(history: str) -> None:
    compressor = _compressor(compression_max_units=5, compression_history=history)
    chat = [_rag()[0], {"role": "assistant", "content": "ok"}, *_rag()]
    result = asyncio.run(compressor.compress(chat, compressor.plan(CompressionControl()), words))
    assert result.outcome == "too_large"
    # Under the cap the same request compresses: the cap, not something else, stopped it.
    roomy = _compressor(compression_max_units=10_000, compression_history=history)
    assert asyncio.run(roomy.compress(chat, roomy.plan(CompressionControl()), words)).outcome == "compressed"


def test_disabled_or_below_threshold_never_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    import ccproxy.compression.pipeline as pipeline

    def no_segmenting(*args: object, **kwargs: object) -> None:
        raise AssertionError("segmented")

    monkeypatch.setattr(pipeline, "segment", no_segmenting)
    compressor = _compressor()
    messages = _rag()
    off = asyncio.run(compressor.compress(messages, compressor.plan(CompressionControl(enabled=False)), words))
    assert off.outcome == "disabled"
    small = asyncio.run(
        compressor.compress(messages, compressor.plan(CompressionControl()), words, prompt_tokens=9)
    )
    assert small.outcome == "below_threshold"
    with pytest.raises(AssertionError, match="segmented"):
        asyncio.run(compressor.compress(messages, compressor.plan(CompressionControl()), words, prompt_tokens=10))


def test_heavy_work_runs_large_inputs_in_threads_and_small_ones_inline() -> None:
    heavy = HeavyWork(concurrency=1, min_chars=100)
    loop_thread = threading.get_ident()

    async def main() -> tuple[int, int]:
        small = await heavy(99, threading.get_ident)
        large = await heavy(100, threading.get_ident)
        return small, large

    small, large = asyncio.run(main())
    assert small == loop_thread
    assert large != loop_thread


def test_heavy_work_keeps_the_loop_free_and_bounds_threads_even_for_abandoned_work() -> None:
    heavy = HeavyWork(concurrency=2, min_chars=0)
    release = threading.Event()
    peak = 0
    running = 0
    lock = threading.Lock()

    def busy() -> None:
        nonlocal peak, running
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(5)
        with lock:
            running -= 1

    async def main() -> float:
        # Four large jobs, all abandoned by their callers after 50 ms (the compressor timeout).
        jobs = [asyncio.create_task(asyncio.wait_for(heavy(1, busy), 0.05)) for _ in range(4)]
        started = time.perf_counter()
        await asyncio.sleep(0.01)  # the loop answers while the threads work
        probe = time.perf_counter() - started
        results = await asyncio.gather(*jobs, return_exceptions=True)
        assert all(isinstance(r, (asyncio.TimeoutError, TimeoutError)) for r in results)
        assert heavy.running <= 2  # slots stay held by the two threads still at work
        release.set()
        for _ in range(100):
            if heavy.running == 0 and running == 0:
                break
            await asyncio.sleep(0.02)
        return probe

    probe = asyncio.run(main())
    assert probe < 0.25
    assert peak <= 2


def test_a_large_body_is_freed_piece_by_piece_and_completely() -> None:
    from ccproxy.compression.offload import release

    content = [{"type": "x", "n": [k]} for k in range(5000)]
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    shared = {**body}  # a second view sharing the same lists, as the forwarded body does
    release(body, shared)
    assert body == {} and shared == {} and content == []
