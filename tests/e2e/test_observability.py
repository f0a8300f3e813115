"""What operators see: /metrics (behind its token) and the access log — never a prompt."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.servers import bentoml_serve, create_key, free_port, running
from tests.e2e.conftest import UPSTREAM_KEY, gateway_env

pytestmark = pytest.mark.e2e

METRICS_TOKEN = "metrics-test-token"


@pytest.fixture(scope="module")
def observed(
    llama_upstream: str, remote_compressor: str, database_url: str, logs_dir: Path
) -> Iterator[tuple[str, str, Path]]:
    """A gateway with a metrics token; yields its URL, a key and its log file."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = logs_dir / "observed.log"
    env = {
        **gateway_env(llama_upstream, remote_compressor, database_url, logs_dir / "observed-data"),
        "CCPROXY_METRICS_TOKEN": METRICS_TOKEN,
        "CCPROXY_COMPRESSION_THRESHOLD_TOKENS": "50",
    }
    key = create_key({"CCPROXY_DATABASE_URL": database_url}, "observed")
    with running(bentoml_serve(port), probe_url=f"{base}/livez", log=log, env=env):
        yield base, key, log


def _metrics(base: str) -> dict[str, float]:
    response = httpx.get(f"{base}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_need_the_token(observed) -> None:
    base, _, _ = observed
    for headers in ({}, {"authorization": "Bearer wrong"}):
        response = httpx.get(f"{base}/metrics", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_metrics_token"


def test_requests_show_up_in_the_metrics_and_the_log_but_their_text_nowhere(observed) -> None:
    base, key, log = observed
    secret = f"zebra-{secrets.token_hex(8)}"
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": " ".join(f"Fact {i}: the {secret} code is {i}." for i in range(30))},
        {"role": "user", "content": f"What is the {secret} code?"},
    ]
    headers = {"x-api-key": key, "authorization": f"Bearer {UPSTREAM_KEY}", "x-request-id": "observed-1"}
    body = {"model": "smollm2-upstream", "messages": messages, "max_tokens": 2}
    whole = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert whole.status_code == 200 and whole.headers["x-compression"] == "compressed"
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                      headers={**headers, "x-request-id": "observed-2"}, timeout=120) as streamed:
        streamed.read()
    bad = httpx.post(f"{base}/v1/chat/completions", headers={**headers, "x-request-id": "observed-3"},
                     content=json.dumps({"model": 1, "messages": messages}).encode())
    assert bad.status_code == 400

    values = _metrics(base)
    assert values['requests_total{status_class="2xx"}'] >= 2
    assert values['tokens_in_total{model_family="embedded"}'] >= int(whole.headers["x-tokens-before"])
    assert values['tokens_saved_total{model_family="embedded"}'] >= int(whole.headers["x-tokens-saved"]) > 0
    assert values['req_latency_seconds_count{stream="true"}'] >= 1
    assert values['compression_latency_seconds_count{outcome="compressed"}'] >= 2
    assert values["upstream_latency_seconds_count"] >= 2

    access = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"log": "chat_completion"')]
    by_id = {line["request_id"]: line for line in access}
    assert by_id["observed-1"]["tokens_saved"] == int(whole.headers["x-tokens-saved"])
    assert by_id["observed-2"]["stream"] is True and by_id["observed-2"]["status"] == 200
    # The refused body has no usage event; ccproxy's own answer is logged, without its message.
    errors = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"log": "error"')]
    refused = [line for line in errors if line["request_id"] == "observed-3"]
    assert refused == [{"log": "error", "request_id": "observed-3", "route": "/v1/chat/completions", "status": 400,
                        "type": "invalid_request_error", "code": bad.json()["error"]["code"]}]
    metrics_text = httpx.get(f"{base}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert secret not in log.read_text()
    assert secret not in metrics_text and key not in log.read_text() and key not in metrics_text
