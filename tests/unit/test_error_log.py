"""Answers ccproxy gives itself are logged (ccproxy.logs.error_line): status, type, code and the
route's template, never the message or the raw path, which can hold the caller's text."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from ccproxy.app import create_app
from ccproxy.settings import Settings


def _post(path: str, headers: dict[str, str]) -> httpx.Response:
    app = create_app(Settings())  # no lifespan: the routes answer 503 "not configured yet"

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post(path, content=b'{"secret": "zebra-4711"}', headers=headers)

    return asyncio.run(go())


def _error_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ccproxy.access"]
    return [line for line in lines if line["log"] == "error"]


def test_an_error_answer_is_one_json_line_without_the_path_or_the_body(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ccproxy.access"):
        answer = _post("/v1/files/zebra-4711-injected", {"x-request-id": "err-1"})
    assert answer.status_code == 503  # a relayed route, refused before its parts exist
    [line] = _error_lines(caplog)
    assert line == {"log": "error", "request_id": "err-1", "route": "/v1/{path:path}", "status": 503,
                    "type": "server_error", "code": None}
    assert "zebra" not in caplog.text and "injected" not in caplog.text


def test_an_unknown_path_is_logged_as_unmatched(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ccproxy.access"):
        answer = _post("/v1/files/zebra-4711%0Ainjected", {"x-request-id": "err-2"})
    assert answer.status_code == 404
    [line] = _error_lines(caplog)
    assert line["route"] == "unmatched" and line["status"] == 404 and line["code"] == "not_found"
    assert "zebra" not in caplog.text and "injected" not in caplog.text
