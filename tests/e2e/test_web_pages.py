"""The admin page and the demo in headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright's Python API), on a served Gateway in front of llama.cpp with the real Compressor and
a fresh PostgreSQL database.

Admin: the page's totals and chart hold the numbers the database holds for the requests sent
here. Demo: the units the page shows as dropped are the ones the Compressor dropped for a
sample RAG chat, the counter ends on its token counts, and nothing reaches the database.

With CCPROXY_CAPTURE_DIR set (`make screenshots`), the same run writes the README's pictures
there: admin.png, demo.png and demo.gif (the saving animation, frame by frame from the page).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from harness.postgres import fresh_database
from harness.servers import create_key
from tests.e2e.conftest import UPSTREAM_KEY, _gateway_to
from tests.e2e.usage_db import wait_for_events

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "web-admin-token-7c1f0a9e3b5d4c2a8e6f"
MODEL = "smollm2-upstream"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CAPTURE_DIR = os.environ.get("CCPROXY_CAPTURE_DIR")


@pytest.fixture(scope="module")
def web_database() -> Iterator[str]:
    with fresh_database("ccproxy_web") as url:
        yield url


@pytest.fixture(scope="module")
def web_gateway(llama_upstream: str, remote_compressor: str, web_database: str, logs_dir: Path) -> Iterator[str]:
    yield from _gateway_to(
        llama_upstream, remote_compressor, web_database, logs_dir, "web",
        CCPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY, CCPROXY_ADMIN_TOKEN=ADMIN_TOKEN, CCPROXY_DEMO_ENABLED="true",
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (Debian: apt-get install -y chromium; .ci/run does)", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def _capture(name: str) -> Path | None:
    if not CAPTURE_DIR:
        return None
    folder = Path(CAPTURE_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _database_totals(url: str) -> dict[str, int]:
    with psycopg.connect(url) as db:
        row = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(tokens_before), 0), COALESCE(SUM(tokens_after), 0), "
            "COALESCE(SUM(tokens_saved), 0) FROM ccproxy_usage_events"
        ).fetchone()
    assert row is not None
    return dict(zip(("requests", "tokens_before", "tokens_after", "tokens_saved"), map(int, row)))


def test_the_admin_chart_shows_the_databases_numbers(
    web_gateway: str, web_database: str, browser: Any, rag_messages: list[dict]
) -> None:
    env = {"CCPROXY_DATABASE_URL": web_database}
    keys = {account: create_key(env, account) for account in ("acme", "globex")}
    short = [{"role": "user", "content": "Say hi."}]
    for account, chats in (("acme", [rag_messages, rag_messages, short]), ("globex", [rag_messages])):
        for messages in chats:
            reply = httpx.post(
                f"{web_gateway}/v1/chat/completions",
                json={"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0},
                headers={"x-api-key": keys[account]}, timeout=300,
            )
            assert reply.status_code == 200, reply.text
    assert len(wait_for_events(web_database, "acme", 3)) == 3
    assert len(wait_for_events(web_database, "globex", 1)) == 1
    expected = _database_totals(web_database)
    assert expected["requests"] == 4 and expected["tokens_saved"] > 0  # the RAG chats were compressed

    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    page.goto(f"{web_gateway}/admin")
    page.fill("#token", "not-the-key")
    page.click("#open")
    page.wait_for_selector("#login-error:has-text('refused')")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#open")
    page.wait_for_selector("body[data-loaded='true']", timeout=30_000)

    shown = {name: float(page.get_attribute(f".value[data-total='{name}']", "data-value") or "nan") for name in expected}
    assert shown == {name: float(value) for name, value in expected.items()}
    # The chart draws every day of the range; its points add up to the same totals.
    for series in ("tokens_before", "tokens_after", "tokens_saved"):
        values = [float(v) for v in (page.get_attribute(f"path[data-series='{series}']", "data-values") or "").split(",")]
        assert len(values) >= 7 and sum(values) == expected[series], series
    assert page.locator("#tokens-chart circle").count() == 3 * len(values)
    accounts = page.locator("#accounts td:first-child").all_text_contents()
    assert accounts == ["acme", "globex"]  # acme sent more tokens
    outcomes = page.locator("#outcomes td:first-child").all_text_contents()
    assert set(outcomes) == {"compressed", "below_threshold"}
    target = _capture("admin.png")
    if target:
        page.screenshot(path=str(target), full_page=True)
    page.close()


def _dropped_texts(answer: dict[str, Any]) -> list[str]:
    return [u["text"] for m in answer["messages"] for u in m["units"] if not u["kept"] and not u["protected"]]


def test_the_demo_highlights_what_the_compressor_dropped(web_gateway: str, web_database: str, browser: Any) -> None:
    events_before = _database_totals(web_database)["requests"]
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"{web_gateway}/demo")
    page.wait_for_function("document.querySelectorAll('#sample option[value]').length === 3")
    sample = json.loads(page.input_value("#chat"))
    frames: list[bytes] = []
    page.click("#run")
    page.wait_for_selector("body[data-state='animating']", timeout=120_000)
    if CAPTURE_DIR:
        while page.get_attribute("body", "data-state") == "animating":
            frames.append(page.screenshot(clip={"x": 0, "y": 0, "width": 1200, "height": 900}))
    page.wait_for_selector("body[data-state='done']", timeout=30_000)

    # The same chat straight to the API: what the page shows is what the Compressor decided.
    answer = httpx.post(f"{web_gateway}/demo/api/compress", json={"messages": sample, "ratio": 0.5}, timeout=300).json()
    assert answer["outcome"] == "compressed" and answer["tokens_saved"] > 0
    shown_dropped = page.locator(".unit.dropped").all_text_contents()
    assert shown_dropped == _dropped_texts(answer) and shown_dropped
    assert page.locator(".unit.dropped.gone").count() == len(shown_dropped)  # the animation ran to its end
    assert page.locator(".unit.kept").count() > 0
    assert page.text_content("#before") == f"{answer['tokens_before']:,}"
    assert page.text_content("#after") == f"{answer['tokens_after']:,}"
    time.sleep(0.5)  # a usage event would be flushed within 0.2 s
    assert _database_totals(web_database)["requests"] == events_before  # the demo stores nothing

    target = _capture("demo.png")
    if target:
        page.screenshot(path=str(target))
        frames.append(page.screenshot(clip={"x": 0, "y": 0, "width": 1200, "height": 900}))
        _write_gif(frames, _capture("demo.gif"))  # type: ignore[arg-type]
    page.close()


def _write_gif(frames: list[bytes], target: Path) -> None:
    """The animation as the page played it, at half size; the last frame holds for 3 s."""
    from PIL import Image

    images = [Image.open(io.BytesIO(frame)).convert("RGB").resize((600, 450)) for frame in frames]
    durations = [120] * (len(images) - 1) + [3000]
    images[0].save(target, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=True)
