"""What must never leave the gateway: the caller's prompt and key, the server's upstream key.

Every fault of the fault upstream and every kind of refused body is sent with a unique secret in
the prompt; then no error (body, in-stream error event), no response header, no line of the
gateway's log and no metric may hold the secret, the caller's ccproxy key or the upstream key
the server holds. Also: CORS is off.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import FAULT_UPSTREAM_KEY
from tests.e2e.servers import create_key

pytestmark = pytest.mark.e2e

FAULTS = [
    "fault-hang-headers", "fault-hang-mid-stream", "fault-429", "fault-500", "fault-503", "fault-reset-headers",
    "fault-reset-mid-stream", "fault-invalid-json", "fault-malformed-sse", "fault-echo-auth", "fault-ok",
]
TIMEOUT = httpx.Timeout(30, connect=5)


@pytest.fixture(scope="module")
def key(database_url: str) -> str:
    return create_key({"CCPROXY_DATABASE_URL": database_url}, "security")


def _bad_bodies(secret: str) -> list[bytes]:
    messages = [{"role": "user", "content": f"my secret is {secret}"}]
    return [
        f'{{"model": "fault-ok", "messages": [{{"role": "user", "content": "{secret}"'.encode(),  # truncated
        json.dumps({"model": 7, "messages": messages}).encode(),
        json.dumps({"model": "fault-ok", "messages": [{"role": "user", "content": {"text": secret}}]}).encode(),
        json.dumps({"model": "fault-ok", "messages": messages, "ccproxy": {secret: 1}}).encode(),
        json.dumps({"model": "fault-ok", "messages": messages}).encode()[:-1] + b"\xff}",
        json.dumps({"model": "fault-ok", "messages": messages, "x": 0}).encode().replace(
            b'"x": 0', b'"x": ' + b"[" * 200 + b"]" * 200
        ),
        json.dumps({"model": "fault-ok", "messages": messages, "pad": secret * ((3 << 20) // len(secret))}).encode(),
    ]


def test_no_prompt_or_key_in_responses_logs_or_metrics(
    faults_gateway: str, key: str, logs_dir: Path
) -> None:
    secret = f"okapi-{secrets.token_hex(8)}"
    seen: list[str] = []

    def record(response: httpx.Response, body: bytes) -> None:
        """Headers always; of a body, the error: a normal answer may quote the prompt (the fault
        upstream's does, on purpose), an error must not."""
        text = body.decode("utf-8", errors="replace")
        seen.append(json.dumps(dict(response.headers)))
        seen.append(text if response.status_code >= 400 else "\n".join(
            line for line in text.splitlines() if line.startswith('data: {"error"')
        ))

    for model in FAULTS:
        for stream in (False, True):
            body = {"model": f"{model}:security", "stream": stream,
                    "messages": [{"role": "user", "content": f"Repeat after me: {secret}"}]}
            with httpx.stream("POST", f"{faults_gateway}/v1/chat/completions", json=body,
                              headers={"authorization": f"Bearer {key}"}, timeout=TIMEOUT) as response:
                record(response, response.read())
    statuses = set()
    for raw in _bad_bodies(secret):
        response = httpx.post(f"{faults_gateway}/v1/chat/completions", content=raw, timeout=TIMEOUT,
                              headers={"x-api-key": key, "content-type": "application/json"})
        statuses.add(response.status_code)
        record(response, response.content)
    assert statuses == {400, 413}
    wrong_key = httpx.post(f"{faults_gateway}/v1/chat/completions", json={"model": "m", "messages": []},
                           headers={"x-api-key": f"ccp_0123456789ab_{secret}"}, timeout=TIMEOUT)
    assert wrong_key.status_code == 401
    record(wrong_key, wrong_key.content)

    echoed = [text for text in seen if "Incorrect API key provided: Bearer" in text]
    assert echoed and all("[redacted]" in text for text in echoed)  # the upstream echoed our key
    metrics = httpx.get(f"{faults_gateway}/metrics", timeout=TIMEOUT).text
    log = (logs_dir / "faults.log").read_text(errors="replace")
    for name, text in [("responses", "\n".join(seen)), ("metrics", metrics), ("log", log)]:
        assert secret not in text, name
        assert FAULT_UPSTREAM_KEY not in text, name
        assert key not in text and key[17:] not in text, name  # neither the key nor its secret part


def test_cors_is_off_by_default(faults_gateway: str, key: str) -> None:
    origin = "https://evil.example"
    preflight = httpx.options(
        f"{faults_gateway}/v1/chat/completions",
        headers={"origin": origin, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"},
    )
    assert preflight.status_code < 500
    cross_origin = [
        httpx.get(f"{faults_gateway}/v1/models", headers={"origin": origin, "x-api-key": key}),
        httpx.get(f"{faults_gateway}/usage", headers={"origin": origin, "x-api-key": key}),
        httpx.post(f"{faults_gateway}/v1/chat/completions", headers={"origin": origin, "x-api-key": key},
                   json={"model": "fault-ok", "messages": [{"role": "user", "content": "hi"}]}, timeout=TIMEOUT),
    ]
    assert [r.status_code for r in cross_origin] == [200, 200, 200]
    for response in (preflight, *cross_origin):
        assert not any(name.startswith("access-control-") for name in response.headers), response.headers
