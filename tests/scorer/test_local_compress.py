"""``ccproxy.compress``: the proxy's compression in-process, on the embedded model."""

from __future__ import annotations

import asyncio

import pytest

import ccproxy
from nqdata.items import load_records, random_distractor_items


def test_compress_keeps_the_gold_passage_and_the_question_within_the_ratio() -> None:
    item = random_distractor_items(load_records("eval"), 20, n_items=1, seed=11)[0]
    result = ccproxy.compress(item.messages(), ratio=0.2)
    assert result.outcome == "compressed"
    content = result.forwarded[0]["content"]
    assert item.record.gold.text in content
    assert item.question in content
    unprotected = [unit for unit in result.units if not unit.protected]
    assert sum(u.kept_tokens for u in unprotected) <= 0.2 * sum(u.tokens for u in unprotected)


def test_compress_refuses_to_run_inside_an_event_loop() -> None:
    async def inside() -> None:
        ccproxy.compress([{"role": "user", "content": "hi"}])

    with pytest.raises(RuntimeError, match="acompress"):
        asyncio.run(inside())


def test_the_ccproxy_command_compresses_messages_from_stdin() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    item = random_distractor_items(load_records("eval"), 20, n_items=1, seed=11)[0]
    ccproxy_command = Path(sys.executable).with_name("ccproxy")  # the console script of this install
    done = subprocess.run([str(ccproxy_command), "compress", "--ratio", "0.2"], input=json.dumps({"messages": item.messages()}),
                          capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout)
    assert result["outcome"] == "compressed" and result["tokens_saved"] > 0
    assert item.record.gold.text in result["messages"][0]["content"]
