"""What must never leave the gateway: the caller's prompt and key, the server's upstream key.

Every fault of the fault upstream and every kind of refused body is sent with a unique secret in
the prompt; then no error (body, in-stream error event), no response header, no line of the
gateway's log and no metric may hold the secret, the caller's ccproxy key or the upstream key
the server holds. Also: CORS is off.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from harness.servers import REPO, bentoml_serve, create_key, free_port
from tests.e2e.conftest import COMPRESSOR_TOKEN, FAULT_UPSTREAM_KEY, _gateway_to

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


# --- issue 15: the security review --------------------------------------------------------------

OWN_KEY_METRICS_TOKEN = "metrics-token-own-key-7d1c"
FAILED_AUTH_LIMIT = 5


@pytest.fixture(scope="module")
def own_key_gateway(fault_upstream: str, remote_compressor: str, database_url: str, logs_dir: Path):
    """In front of the fault upstream without a server-held key (callers bring their own), in
    production mode, with a small failed-key budget and one allowed image host."""
    yield from _gateway_to(
        fault_upstream, remote_compressor, database_url, logs_dir, "own-key",
        CCPROXY_ENVIRONMENT="production",
        CCPROXY_METRICS_TOKEN=OWN_KEY_METRICS_TOKEN,
        CCPROXY_AUTH_FAILURES_PER_MINUTE=str(FAILED_AUTH_LIMIT),
        CCPROXY_KEY_CACHE_TTL_S="600",  # a verified key stays cached for the whole module
        CCPROXY_IMAGE_URL_HOSTS='["img.example.com"]',
    )


def _endpoint_series(metrics: str) -> set[str]:
    """The series (name and labels, no value) that carry an ``endpoint`` label."""
    return {line.rsplit(" ", 1)[0] for line in metrics.splitlines() if "endpoint=" in line and not line.startswith("#")}


def test_random_paths_add_no_metric_series(faults_gateway: str) -> None:
    shapes = ["/{t}", "/v1/{t}", "/{t}/{t}.php", "/v1/{t}/x"]

    def send(n: int) -> list[str]:
        sent = []
        for i in range(n):
            token = f"p{secrets.token_hex(6)}"
            sent.append(token)
            method = "GET" if i % 8 < 4 else "POST"
            response = httpx.request(method, faults_gateway + shapes[i % 4].format(t=token), timeout=TIMEOUT)
            assert response.status_code in (404, 405), (method, response.status_code)
        return sent

    send(8)  # every path shape and method once: the series for unknown paths exist from here on
    before = httpx.get(f"{faults_gateway}/metrics", timeout=TIMEOUT).text
    tokens = send(200)
    after = httpx.get(f"{faults_gateway}/metrics", timeout=TIMEOUT).text
    assert _endpoint_series(after) == _endpoint_series(before)
    assert 'endpoint="other"' in after and 'endpoint="/v1/chat/completions"' in after
    assert not any(token in after for token in tokens)


def test_the_remote_compressor_takes_only_calls_with_the_shared_secret(
    remote_compressor: str, faults_gateway: str, key: str, rag_messages: list[dict]
) -> None:
    body = {"requests": [{"query": "Who?", "units": ["Paris is in France.", "Bananas are yellow."]}]}
    for headers in ({}, {"x-compressor-token": "wrong"}, {"authorization": f"Bearer {COMPRESSOR_TOKEN}"}):
        refused = httpx.post(f"{remote_compressor}/score", json=body, headers=headers, timeout=TIMEOUT)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_compressor_token"
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    scored = httpx.post(f"{remote_compressor}/score", json=body, timeout=60,
                        headers={"x-compressor-token": COMPRESSOR_TOKEN})
    assert scored.status_code == 200 and len(scored.json()[0]) == 2
    assert httpx.get(f"{remote_compressor}/readyz", timeout=TIMEOUT).status_code == 200  # probes stay open
    # The gateway sends the secret: its requests are compressed, not failed open.
    client = openai.OpenAI(base_url=f"{faults_gateway}/v1", api_key=key, max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="fault-ok:compressor-token", messages=rag_messages, extra_headers={"x-compression-ratio": "0.3"}
    )
    assert raw.headers["x-compression"] == "compressed"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_upstream_that_gzips_is_asked_for_identity(faults_gateway: str, key: str, stream: bool) -> None:
    client = openai.OpenAI(base_url=f"{faults_gateway}/v1", api_key=key, max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        chunks = client.chat.completions.create(model="fault-gzip", messages=messages, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(model="fault-gzip", messages=messages).choices[0].message.content
    assert text == "Hello world"


def test_a_server_held_keys_account_headers_never_reach_callers(
    faults_gateway: str, own_key_gateway: str, key: str
) -> None:
    body = {"model": "fault-429:headers", "messages": [{"role": "user", "content": "hi"}]}
    account_headers = ("x-ratelimit-remaining-requests", "openai-organization", "openai-project")
    held = httpx.post(f"{faults_gateway}/v1/chat/completions", json=body, headers={"x-api-key": key}, timeout=TIMEOUT)
    assert held.status_code == 429 and held.headers["retry-after"] == "7"
    assert not any(header in held.headers for header in account_headers)
    own = httpx.post(f"{own_key_gateway}/v1/chat/completions", json=body, timeout=TIMEOUT,
                     headers={"x-api-key": key, "authorization": "Bearer sk-caller-own-key"})
    assert own.status_code == 429 and own.headers["retry-after"] == "7"
    assert [own.headers.get(h) for h in account_headers] == ["0", "org-fault-upstream", "proj_fault_upstream"]


def test_image_urls_for_a_self_hosted_upstream(faults_gateway: str, own_key_gateway: str, key: str) -> None:
    def ask(gateway: str, url: str):  # type: ignore[no-untyped-def]
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="sk-caller-own-key", max_retries=0, timeout=30,
                               default_headers={"x-api-key": key})
        content = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": url}}]
        return client.chat.completions.create(model="fault-ok:image", messages=[{"role": "user", "content": content}])

    data_url = "data:image/png;base64,iVBORw0KGgo="
    # The fault upstream is on loopback, so by default only data: URLs go to it.
    assert ask(faults_gateway, data_url).model_extra["received"]["messages"][0]["content"][1]["image_url"]["url"] == data_url
    for gateway, url in [
        (faults_gateway, "http://169.254.169.254/latest/meta-data/iam/"),
        (faults_gateway, "https://img.example.com/cat.png"),
        (own_key_gateway, "http://169.254.169.254/latest/meta-data/iam/"),
        (own_key_gateway, "https://img.example.com@10.0.0.1/cat.png"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(gateway, url)
        error = caught.value.body
        assert (caught.value.status_code, caught.value.code) == (400, "invalid_image_url")
        assert error["param"] == "messages[0].content[1].image_url.url" and url not in json.dumps(error)
    assert ask(own_key_gateway, "https://img.example.com/cat.png").choices[0].message.content == "Hello world"


def test_errors_quote_neither_the_usage_range_nor_the_key(faults_gateway: str, key: str) -> None:
    too_long = httpx.get(f"{faults_gateway}/usage", params={"from": "2000-01-01"}, headers={"x-api-key": key},
                         timeout=TIMEOUT)
    assert too_long.status_code == 400
    assert set(too_long.json()["error"]) == {"message", "type", "param", "code"}
    assert "2000-01-01" not in too_long.text
    secret = f"okapi-{secrets.token_hex(8)}"
    bad = httpx.get(f"{faults_gateway}/usage", params={"from": secret}, headers={"x-api-key": key}, timeout=TIMEOUT)
    assert bad.status_code == 400 and secret not in bad.text
    for presented in (f"ccp_5ec7e7a11b0b_{secret}", f"Zq8{secret}"):
        wrong = httpx.get(f"{faults_gateway}/v1/models", headers={"authorization": f"Bearer {presented}"},
                          timeout=TIMEOUT)
        assert wrong.status_code == 401
        assert presented[:8] not in wrong.text and secret not in wrong.text
    unknown = httpx.get(f"{faults_gateway}/v1/{secret}", timeout=TIMEOUT)
    assert unknown.status_code == 404 and secret not in unknown.text


def test_secrets_in_model_user_and_key_stay_out_of_errors_logs_and_metrics(
    faults_gateway: str, key: str, logs_dir: Path
) -> None:
    secret = f"sk-proj-{secrets.token_urlsafe(24)}"
    url = f"{faults_gateway}/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    sent = [
        # refused before forwarding: the model (and the user) of a bad body
        ({"model": secret, "messages": "not a list", "user": secret}, {"x-api-key": key}, 400),
        ({"model": secret, "messages": messages, "stream": "yes"}, {"x-api-key": key}, 400),
        ({"model": secret, "messages": messages, "user": secret}, {"x-api-key": f"ccp_5ec7e7a11b0b_{secret}"}, 401),
        ({"model": secret, "messages": messages}, {"authorization": f"Bearer {secret}"}, 401),
        # accepted: the user field is forwarded, never logged (the model is, as the usage's key)
        ({"model": "fault-500:user", "messages": messages, "user": secret}, {"x-api-key": key}, 500),
        ({"model": "fault-ok:user", "messages": messages, "user": secret}, {"x-api-key": key}, 200),
    ]
    for body, headers, status in sent:
        response = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT)
        assert response.status_code == status, (body, response.text)
        if status >= 400:
            assert secret not in response.text
            assert set(response.json()["error"]) >= {"message", "type", "code"}
        assert secret not in json.dumps(dict(response.headers))
    metrics = httpx.get(f"{faults_gateway}/metrics", timeout=TIMEOUT).text
    log = (logs_dir / "faults.log").read_text(errors="replace")
    assert secret not in metrics and secret not in log
    assert secret[:12] not in log  # not even a prefix of it


def test_production_mode_refuses_to_start_with_an_open_metrics_endpoint(
    tmp_path: Path, own_key_gateway: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    env.update(CCPROXY_ENVIRONMENT="production", CCPROXY_DATA_DIR=str(tmp_path), BENTOML_HOME=str(tmp_path / "home"),
               CCPROXY_UPSTREAM_URL="http://127.0.0.1:9/v1")
    done = subprocess.run(bentoml_serve(free_port()), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "CCPROXY_METRICS_TOKEN" in done.stderr + done.stdout
    # With a token (and the Compressor's secret) production starts, and /metrics wants the token.
    assert httpx.get(f"{own_key_gateway}/metrics", timeout=TIMEOUT).status_code == 401
    authorized = {"authorization": f"Bearer {OWN_KEY_METRICS_TOKEN}"}
    assert httpx.get(f"{own_key_gateway}/metrics", headers=authorized, timeout=TIMEOUT).status_code == 200


def test_failed_keys_from_one_address_get_429_then_valid_cached_keys_still_pass(
    own_key_gateway: str, key: str
) -> None:
    """Last in this module: it spends 127.0.0.1's failed-key budget on this gateway."""
    messages = [{"role": "user", "content": "hi"}]

    def client(ccproxy_key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{own_key_gateway}/v1", api_key="sk-caller-own-key", max_retries=0,
                             timeout=30, default_headers={"x-api-key": ccproxy_key})

    assert client(key).chat.completions.create(model="fault-ok", messages=messages).choices  # cached now
    for _ in range(FAILED_AUTH_LIMIT):
        with pytest.raises(openai.AuthenticationError):
            client(f"ccp_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}").models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        client(f"ccp_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}").models.list()
    assert caught.value.code == "too_many_failed_auth"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert client(key).chat.completions.create(model="fault-ok", messages=messages).choices
