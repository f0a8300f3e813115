"""Our prompt count against the prompt_tokens a real upstream (llama.cpp's server) reports."""

from __future__ import annotations

import pytest
from openai import OpenAI

from ccproxy.settings import Settings
from ccproxy.tokens import counter_for
from tests.e2e.chat_corpus import varied_chats
from tests.e2e.conftest import UPSTREAM_KEY

pytestmark = pytest.mark.e2e

MODEL = "smollm2-upstream"  # the alias llama_upstream serves; no table knows it: the default, embedded
TOLERANCE = 2


def test_prompt_count_matches_llama_cpp_usage(llama_upstream: str) -> None:
    client = OpenAI(base_url=llama_upstream, api_key=UPSTREAM_KEY, timeout=60, max_retries=0)
    counter = counter_for(MODEL, Settings())
    assert counter.name == "embedded"
    misses = []
    for i, messages in enumerate(varied_chats(100, seed=0)):
        body = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}
        usage = client.chat.completions.create(**body).usage
        assert usage is not None
        ours = counter.count_prompt(body)
        misses.append((abs(ours - usage.prompt_tokens), i, ours, usage.prompt_tokens))
    worst = sorted(misses, reverse=True)[:5]
    assert worst[0][0] <= TOLERANCE, "worst (|diff|, chat, ours, upstream): " + ", ".join(map(str, worst))
