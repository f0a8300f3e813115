"""The /metrics guard, on a bare ASGI app."""

from __future__ import annotations

import asyncio

import httpx

from ccproxy.metrics import MetricsTokenMiddleware, status_class


async def _ok(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"metrics"})


def _get(app, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(go())


def test_metrics_need_the_token_other_paths_do_not() -> None:
    guarded = MetricsTokenMiddleware(_ok, token="s3cret")
    assert _get(guarded, "/metrics").status_code == 401
    assert _get(guarded, "/metrics", {"authorization": "Bearer nope"}).status_code == 401
    assert _get(guarded, "/metrics", {"authorization": "Bearer s3cret"}).status_code == 200
    assert _get(guarded, "/livez").status_code == 200


def test_without_a_token_metrics_are_open() -> None:
    assert _get(MetricsTokenMiddleware(_ok, token=None), "/metrics").status_code == 200


def test_status_classes() -> None:
    assert [status_class(s) for s in (200, 404, 429, 502)] == ["2xx", "4xx", "4xx", "5xx"]
