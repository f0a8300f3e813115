"""The bill and prompt-cache maths of bench/cost_model.py."""

from __future__ import annotations

import pytest

from bench.cost_model import (
    PROFILES,
    SONNET_STYLE,
    PriceProfile,
    Request,
    cached_tokens,
    common_prefix,
    net_saving,
    render_ids,
    request_cost,
    session_cache,
    session_cost,
)
from ccproxy.tokens import TiktokenCounter, tiktoken_encoding

FLAT = PriceProfile("flat", input=2.0, cached_input=0.5, output=8.0, source="test")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2, 4], 2), ([5], [6], 0), ([1, 2], [1, 2, 3, 4], 2)],
)
def test_common_prefix(a: list[int], b: list[int], expected: int) -> None:
    assert common_prefix(a, b) == expected
    assert common_prefix(b, a) == expected


def test_cached_tokens_round_down_to_blocks_and_need_the_minimum() -> None:
    earlier = list(range(3000))
    assert cached_tokens(list(range(1023)) + [-1], [earlier]) == 0  # 1,023 shared: under the minimum
    assert cached_tokens(list(range(1100)), [earlier]) == 1024
    assert cached_tokens(list(range(1300)) + [-1] * 50, [earlier]) == 1280
    assert cached_tokens(list(range(1300)), [earlier], block=100, minimum=200) == 1300
    assert cached_tokens([-1] + list(range(2000)), [earlier]) == 0  # a changed first token: no prefix


def test_the_longest_prefix_over_all_earlier_requests_counts() -> None:
    first, second = list(range(5000)), list(range(2000)) + [-7] * 3000
    prompts = [first, second, list(range(4200)) + [-9]]
    # The second request shares 2,000 tokens with the first; the third 4,200 with the first.
    assert session_cache(prompts) == [0, 1920, 4096]


def test_request_cost_is_uncached_plus_cached_plus_output() -> None:
    request = Request(prompt_tokens=3000, cached_tokens=2048, output_tokens=100)
    expected = (952 * 2.0 + 2048 * 0.5 + 100 * 8.0) / 1e6
    assert request_cost(request, FLAT) == pytest.approx(expected)
    assert session_cost([request, request], FLAT) == pytest.approx(2 * expected)


def test_cache_writes_cost_extra_only_on_cacheable_prompts() -> None:
    long, short = Request(2000, 1024, 0), Request(900, 0, 0)
    assert request_cost(long, SONNET_STYLE) == pytest.approx((976 * 3.75 + 1024 * 0.30) / 1e6)
    assert request_cost(short, SONNET_STYLE) == pytest.approx(900 * 3.00 / 1e6)


def test_a_request_cannot_cache_more_than_its_prompt() -> None:
    with pytest.raises(ValueError):
        Request(prompt_tokens=10, cached_tokens=11, output_tokens=0)


def test_net_saving() -> None:
    assert net_saving(60.0, 100.0) == pytest.approx(0.4)
    assert net_saving(120.0, 100.0) == pytest.approx(-0.2)


# The published list prices (USD per million tokens: input, cached input, output), written here
# independently of bench/cost_model.py so that a typo there fails this test.
PUBLISHED = {
    "gpt-4o": (2.50, 1.25, 10.00),
    "gpt-4.1": (2.00, 0.50, 8.00),
    "90 % cache discount": (3.00, 0.30, 15.00),  # Claude Sonnet 4's prices
}


def test_profiles_match_the_published_prices() -> None:
    assert {p.name: (p.input, p.cached_input, p.output) for p in PROFILES} == PUBLISHED


def test_each_profile_agrees_with_the_discount_its_source_states() -> None:
    """The ``source`` note states the discount in words; the numbers must say the same."""
    import re

    for profile in PROFILES:
        off = re.search(r"cached input (\d+) % off", profile.source)
        reads = re.search(r"cache reads ([\d.]+)x", profile.source)
        writes = re.search(r"cache writes ([\d.]+)x", profile.source)
        assert off or reads, profile.name
        if off:
            assert profile.cached_input == pytest.approx(profile.input * (1 - int(off.group(1)) / 100)), profile.name
            assert profile.cache_write is None
        if reads:
            assert profile.cached_input == pytest.approx(profile.input * float(reads.group(1))), profile.name
        if writes:
            assert profile.cache_write == pytest.approx(profile.input * float(writes.group(1))), profile.name


def test_rendered_prompt_has_the_cookbook_token_count_and_is_prefix_stable() -> None:
    encoding = tiktoken_encoding("o200k_base")
    messages = [
        {"role": "system", "content": "Answer from the documents."},
        {"role": "user", "content": "Document [1] (Title: Zurich) The treaty was signed in 1859.\n\nWhen?"},
        {"role": "assistant", "content": "In 1859."},
    ]
    ids = render_ids(messages, encoding.encode_ordinary)
    assert len(ids) == TiktokenCounter(encoding).count_prompt({"messages": messages})
    longer = render_ids([*messages, {"role": "user", "content": "And where?"}], encoding.encode_ordinary)
    # The shorter prompt is a prefix of the longer one up to its reply priming's <|im_start|>.
    assert common_prefix(ids, longer) == len(ids) - 2
