"""What a chat session costs with the provider's prompt cache counted. Pure functions.

The bill of a session = uncached input × input price + cached input × cached price + output ×
output price, request by request. Providers cache prompt *prefixes*: OpenAI's documented rule
(platform.openai.com/docs/guides/prompt-caching) caches prompts of 1,024 tokens or more and
reports hits in 128-token steps. The simulation follows it: request n's cached tokens are its
longest common token prefix with any earlier request of the session, rounded down to a
multiple of ``block`` and 0 below ``minimum``. Assumed: every earlier request is still cached
(turns minutes apart, inside the 5-10 minute lifetime) and one cache serves the whole session.

Prompts are token ids of the rendered chat, as OpenAI's cookbook counts a chat for gpt-4o
(``ccproxy.tokens.TiktokenCounter``): per message ``<|im_start|>``, the role, ``<|im_sep|>``,
the content, ``<|im_end|>``; then ``<|im_start|>assistant<|im_sep|>`` primes the reply. Each
piece is tokenized on its own with tiktoken's o200k, so a message's ids never depend on what
follows it, and a prompt that resends the same messages starts with the same ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ccproxy.tokens import content_text

# gpt-4o's chat framing tokens (not in tiktoken's o200k ranks file, which only has plain text).
IM_START, IM_END, IM_SEP = 200264, 200265, 200266
OPENAI_CACHE_BLOCK, OPENAI_CACHE_MINIMUM = 128, 1024

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class PriceProfile:
    """USD per million tokens. ``cache_write``: what uncached input of a cacheable prompt costs
    where writing the cache is billed extra (None: the input price)."""

    name: str
    input: float
    cached_input: float
    output: float
    source: str
    cache_write: float | None = None


# Assumptions, from the providers' public price lists (2025); change them here, not in the bench.
GPT_4O = PriceProfile(
    "gpt-4o", 2.50, 1.25, 10.00, "openai.com/api/pricing: gpt-4o, cached input 50 % off"
)
GPT_41 = PriceProfile(
    "gpt-4.1", 2.00, 0.50, 8.00, "openai.com/api/pricing: gpt-4.1, cached input 75 % off"
)
SONNET_STYLE = PriceProfile(
    "90 % cache discount",
    3.00,
    0.30,
    15.00,
    "anthropic.com/pricing: Claude Sonnet 4 cache reads 0.1x, 5-minute cache writes 1.25x "
    "(applied here with OpenAI's automatic prefix rule, not Anthropic's explicit breakpoints)",
    cache_write=3.75,
)
PROFILES: tuple[PriceProfile, ...] = (GPT_4O, GPT_41, SONNET_STYLE)


def render_ids(messages: Sequence[Mapping[str, Any]], encode: Encode) -> list[int]:
    """The prompt's token ids (module docstring); its length is TiktokenCounter's count for
    plain-text messages without ``name``."""
    ids: list[int] = []
    for message in messages:
        ids += [IM_START, *encode(str(message.get("role", ""))), IM_SEP]
        ids += encode(content_text(message.get("content")))
        ids.append(IM_END)
    return ids + [IM_START, *encode("assistant"), IM_SEP]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix; binary search over slice comparisons (done in C),
    since sessions compare tens of thousands of ids per request."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def cached_tokens(
    prompt: Sequence[int],
    earlier: Sequence[Sequence[int]],
    *,
    block: int = OPENAI_CACHE_BLOCK,
    minimum: int = OPENAI_CACHE_MINIMUM,
) -> int:
    """Tokens of ``prompt`` served from the cache that ``earlier`` prompts left."""
    if block < 1 or minimum < 0:
        raise ValueError(f"block must be >= 1 and minimum >= 0, got {block} and {minimum}")
    longest = max((common_prefix(prompt, other) for other in earlier), default=0)
    cached = longest // block * block
    return cached if cached >= minimum else 0


def session_cache(
    prompts: Sequence[Sequence[int]], *, block: int = OPENAI_CACHE_BLOCK, minimum: int = OPENAI_CACHE_MINIMUM
) -> list[int]:
    """Cached tokens of each request of a session, in order."""
    return [cached_tokens(p, prompts[:n], block=block, minimum=minimum) for n, p in enumerate(prompts)]


@dataclass(frozen=True)
class Request:
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if not 0 <= self.cached_tokens <= self.prompt_tokens or self.output_tokens < 0:
            raise ValueError(f"inconsistent request {self}")


def request_cost(request: Request, profile: PriceProfile, *, minimum: int = OPENAI_CACHE_MINIMUM) -> float:
    """USD for one request. A prompt long enough to be cached writes its uncached part."""
    uncached = request.prompt_tokens - request.cached_tokens
    uncached_price = profile.input
    if profile.cache_write is not None and request.prompt_tokens >= minimum:
        uncached_price = profile.cache_write
    return (
        uncached * uncached_price
        + request.cached_tokens * profile.cached_input
        + request.output_tokens * profile.output
    ) / 1_000_000


def session_cost(requests: Sequence[Request], profile: PriceProfile, *, minimum: int = OPENAI_CACHE_MINIMUM) -> float:
    return sum(request_cost(r, profile, minimum=minimum) for r in requests)


class BilledRequests:
    """For a benchmark's run of one arm: its requests from per-request token lists (the class
    that mixes this in has ``prompt_tokens``, ``cached_tokens`` and ``output_tokens``), and their bill."""

    prompt_tokens: list[int]
    cached_tokens: list[int]
    output_tokens: list[int]

    def requests(self) -> list[Request]:
        return [Request(*values) for values in zip(self.prompt_tokens, self.cached_tokens, self.output_tokens)]

    def bill(self, profile: PriceProfile, *, cache: bool = True) -> float:
        """USD; ``cache=False``: as if the provider cached nothing."""
        requests = self.requests()
        if not cache:
            requests = [Request(r.prompt_tokens, 0, r.output_tokens) for r in requests]
        return session_cost(requests, profile)


def net_saving(cost: float, baseline: float) -> float:
    """Share of the baseline bill saved (negative: it costs more)."""
    return (baseline - cost) / baseline if baseline else 0.0
