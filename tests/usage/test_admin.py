"""The admin page's data (ccproxy/admin/): its queries on real SQLite and PostgreSQL stores, the
report's numbers against the events written, and the route's guard (404 off, 401, 429)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest

from ccproxy.admin.queries import read_admin_data
from ccproxy.admin.report import build_admin_report
from ccproxy.app import create_app
from ccproxy.pricing import parse_table
from ccproxy.settings import Settings
from ccproxy.usage.events import UsageEvent
from tests.usage.conftest import Backend
from tests.usage.helpers import BASE, make_event

PRICES = parse_table('{"default": {"input": "10", "output": "30"}, "models": {"gpt-4o": {"input": "2.50", "output": "10"}}}')
TOKEN = "admin-test-token-0123456789abcdef"


def _seed(backend: Backend) -> list[UsageEvent]:
    store = backend.store
    acme, beta = store.ensure_account("acme"), store.ensure_account("beta")
    store.insert_key("key_acme1", acme, "0" * 64, "ci runner")
    store.insert_key("key_beta1", beta, "1" * 64, None)
    events = [
        make_event(acme, BASE, key_id="key_acme1", model="gpt-4o", tokens_before=1000, tokens_after=400, tokens_saved=600),
        make_event(acme, BASE + timedelta(minutes=30), key_id="key_acme1", model="gpt-4o-2024-08-06",
                   tokens_before=3000, tokens_after=1000, tokens_saved=2000),
        make_event(acme, BASE + timedelta(hours=5), key_id="key_acme1", model="other", tokens_before=500,
                   tokens_after=500, tokens_saved=0, compression="below_threshold"),
        make_event(beta, BASE + timedelta(days=1), key_id="key_beta1", model="gpt-4o", tokens_before=800,
                   tokens_after=200, tokens_saved=600),
        # Outside the range asked for below: counted nowhere.
        make_event(beta, BASE + timedelta(days=9), key_id="key_beta1", model="gpt-4o", tokens_before=7),
    ]
    store.write_events(events)
    return events


def test_the_report_adds_up_to_the_events_written(backend: Backend) -> None:
    events = _seed(backend)
    start, end = BASE - timedelta(hours=2), BASE + timedelta(days=3)
    data = read_admin_data(backend.store, start, end)
    report = build_admin_report(data.groups, data.series, data.outcomes, start, end, "day", PRICES, "usd")
    inside = events[:4]
    totals = report["totals"]
    assert totals["requests"] == 4
    assert totals["tokens_before"] == sum(e.tokens_before for e in inside) == 5300
    assert totals["tokens_saved"] == sum(e.tokens_saved for e in inside) == 3200
    # 600 + 2000 + 600 saved on gpt-4o (a snapshot takes its row) at 2.50, 0 on `other` at 10.
    assert Decimal(str(totals["money_saved"])) == Decimal(3200) * Decimal("2.50") / 1_000_000
    assert [b["start"][:10] for b in report["series"]] == ["2024-05-01", "2024-05-02", "2024-05-03", "2024-05-04"]
    assert [b["tokens_before"] for b in report["series"]] == [4500, 800, 0, 0]
    assert sum(b["money_saved"] for b in report["series"]) == pytest.approx(totals["money_saved"])
    assert [(a["name"], a["tokens_before"], a["requests"]) for a in report["accounts"]] == [("acme", 4500, 3), ("beta", 800, 1)]
    assert [(k["key_id"], k["account"], k["label"]) for k in report["keys"]] == [
        ("key_acme1", "acme", "ci runner"), ("key_beta1", "beta", None),
    ]
    assert [m["model"] for m in report["models"]] == ["gpt-4o-2024-08-06", "gpt-4o", "other"]
    assert report["outcomes"] == [{"outcome": "compressed", "requests": 3}, {"outcome": "below_threshold", "requests": 1}]
    assert not report["truncated"]


def test_a_capped_query_says_the_lists_are_cut(backend: Backend) -> None:
    _seed(backend)
    data = read_admin_data(backend.store, BASE - timedelta(hours=1), BASE + timedelta(days=3), max_rows=2)
    assert data.truncated and len(data.groups) == 2 and len(data.series) == 2


def _call(settings: Settings, backend: Backend | None, method: str, path: str, **kwargs) -> httpx.Response:
    app = create_app(settings)
    if backend is not None:
        app.state.store = backend.store

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_without_a_token_the_admin_routes_do_not_exist() -> None:
    for path in ("/admin", "/admin/api/summary"):
        response = _call(Settings(), None, "GET", path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_the_summary_needs_the_operators_key(backend: Backend) -> None:
    _seed(backend)
    settings = Settings(admin_token=TOKEN, auth_failures_per_minute=3)
    page = _call(settings, backend, "GET", "/admin")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    query = "/admin/api/summary?from=2024-04-30&to=2024-05-04&granularity=day"
    missing = _call(settings, backend, "GET", query)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_admin_token"
    ok = _call(settings, backend, "GET", query, headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.headers["cache-control"] == "no-store"
    assert ok.json()["totals"]["tokens_before"] == 5300
    bad = _call(settings, backend, "GET", "/admin/api/summary?granularity=week", headers={"authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "granularity"


def test_guessing_the_key_runs_out_of_tries() -> None:
    app = create_app(Settings(admin_token=TOKEN, auth_failures_per_minute=2))

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            wrong = {"authorization": "Bearer guess"}
            return [(await client.get("/admin/api/summary", headers=wrong)).status_code for _ in range(4)]

    assert asyncio.run(go()) == [401, 401, 429, 429]
