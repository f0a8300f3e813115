"""The demo's guards and answer (ccproxy/demo.py) and the pages' static files (ccproxy/web/).
The demo against the real Compressor, in Chromium: tests/e2e/test_web_pages.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from ccproxy.app import create_app
from ccproxy.compression.pipeline import Compression, UnitReport
from ccproxy.demo import DemoApi, DemoCall, demo_answer, parse_demo_call, samples
from ccproxy.protocol import ProxyError
from ccproxy.settings import Settings


def _body(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hello"}], **fields}).encode()


def test_the_chat_is_capped_before_anything_is_done() -> None:
    assert parse_demo_call(_body(ratio=0.3), 1000).ratio == 0.3
    with pytest.raises(ProxyError) as too_long:
        parse_demo_call(json.dumps({"messages": [{"role": "user", "content": "x" * 1001}]}).encode(), 1000)
    assert too_long.value.status == 413
    for bad in (
        _body(ratio=0.01),
        _body(extra=1),
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "x"}] * 101}).encode(),
        json.dumps({"messages": []}).encode(),
    ):
        with pytest.raises(ProxyError) as refused:
            parse_demo_call(bad, 1000)
        assert refused.value.status == 400


def test_each_address_and_everyone_get_a_few_runs_a_minute() -> None:
    demo = DemoApi(Settings(demo_enabled=True, demo_requests_per_minute=2, demo_total_requests_per_minute=3))
    demo.admit("10.0.0.1")
    demo.admit("10.0.0.1")
    with pytest.raises(ProxyError) as per_address:
        demo.admit("10.0.0.1")
    assert per_address.value.status == 429
    demo.admit("10.0.0.2")  # the third run of the minute, from elsewhere
    with pytest.raises(ProxyError) as everyone:
        demo.admit("10.0.0.3")
    assert everyone.value.status == 429
    with pytest.raises(ProxyError) as off:
        DemoApi(Settings()).admit("10.0.0.1")
    assert off.value.status == 404


def test_the_answer_puts_each_unit_under_its_message() -> None:
    call = DemoCall.model_validate({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Doc one. Doc two.\n\nQuestion?"},
    ], "ratio": 0.5})
    units = (
        UnitReport(0, "sentence", 3, False, True, 0.9, 3, "Doc one.", 1),
        UnitReport(1, "sentence", 3, False, False, 0.1, 0, "Doc two.", 1),
        UnitReport(2, "query", 2, True, True, None, 2, "Question?", 1),
    )
    answer = demo_answer(call, Compression([], "compressed", 8, 5, units))
    assert answer["tokens_saved"] == 3 and answer["savings_percent"] == 37.5
    system, user = answer["messages"]
    assert system["units"][0]["text"] == "Be brief." and system["units"][0]["kept"]  # not segmented: whole
    assert [(u["text"], u["kept"]) for u in user["units"]] == [("Doc one.", True), ("Doc two.", False), ("Question?", True)]


def test_unit_texts_never_reach_the_compress_api_answer() -> None:
    report = UnitReport(0, "sentence", 3, False, True, 0.9, 3, "secret text", 0)
    assert "secret text" not in json.dumps(report.as_dict()) and "secret text" not in repr(report)


def test_the_samples_are_rag_chats_with_their_source() -> None:
    data = samples()
    assert "CC BY-SA" in data["source"] and len(data["samples"]) == 3
    for sample in data["samples"]:
        parse_demo_call(json.dumps({"messages": sample["messages"]}).encode(), Settings().demo_max_chars)
        assert sample["messages"][-1]["content"].rstrip().endswith("Answer:")


def _get(settings: Settings, path: str) -> httpx.Response:
    app = create_app(settings)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get(path)

    return asyncio.run(go())


def test_only_the_listed_files_are_served_with_their_type_and_policy() -> None:
    settings = Settings(demo_enabled=True)
    script = _get(settings, "/web/demo.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert script.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in script.headers["content-security-policy"]
    page = _get(settings, "/demo")
    assert page.status_code == 200 and '<script type="module" src="/web/demo.js">' in page.text
    for path in ("/web/__init__.py", "/web/demo_samples.json", "/web/..%2fsettings.py", "/web/nope.js"):
        assert _get(settings, path).status_code == 404, path
    assert _get(Settings(), "/demo").status_code == 404  # off by default
    assert _get(Settings(), "/demo/api/samples").status_code == 404


def test_the_committed_samples_are_what_the_tool_writes() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "tools" / "demo_samples.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
