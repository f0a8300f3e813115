"""Every other OpenAI route through a served Gateway (issue 16, part 1).

Against llama.cpp's server (a real upstream no one here wrote) with the official ``openai``
client, callers bringing their own provider key: legacy completions, whole and streamed, with
their usage event; a route llama.cpp does not have comes back as its own 404, unchanged.
Against the fault upstream, which describes the request it received: multipart bodies and query
strings arrive byte for byte with the caller's own key, file headers come back; embeddings (a
stand-in for a paid provider) write a usage event of their own kind. While the server holds the
provider key only stateless, metered routes are relayed. Unknown routes and path tricks are 404.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from harness.servers import create_key
from tests.e2e.conftest import UPSTREAM_KEY, _gateway_to
from tests.e2e.usage_db import wait_for_events

pytestmark = pytest.mark.e2e

LLAMA_MODEL = "smollm2-upstream"
CALLER_PROVIDER_KEY = "sk-caller-own-provider-key"


@pytest.fixture(scope="module")
def relay_gateway(fault_upstream: str, remote_compressor: str, database_url: str, logs_dir: Path) -> Iterator[str]:
    """In front of the fault upstream, holding no provider key: callers bring their own."""
    yield from _gateway_to(fault_upstream, remote_compressor, database_url, logs_dir, "relay")


@pytest.fixture(scope="module")
def key(database_url: str) -> str:
    return create_key({"CCPROXY_DATABASE_URL": database_url}, "passthrough-routes")


def test_legacy_completions_through_the_sdk_with_a_usage_event(
    passthrough_gateway: str, key: str, database_url: str
) -> None:
    client = openai.OpenAI(  # the caller's own provider key; its ccproxy key beside it
        base_url=f"{passthrough_gateway}/v1", api_key=UPSTREAM_KEY, default_headers={"x-api-key": key},
        max_retries=0, timeout=120,
    )
    whole = client.completions.create(model=LLAMA_MODEL, prompt="The capital of France is", max_tokens=4)
    assert whole.choices[0].text and whole.usage is not None
    pieces = [c.choices[0].text for c in client.completions.create(
        model=LLAMA_MODEL, prompt="One, two,", max_tokens=4, stream=True
    ) if c.choices]
    assert "".join(pieces)
    [event] = [e for e in wait_for_events(database_url, "passthrough-routes", 1) if e["kind"] == "completions"]
    assert event["model"] == LLAMA_MODEL
    assert (event["prompt_tokens"], event["completion_tokens"]) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert event["tokens_after"] == whole.usage.prompt_tokens


def test_a_route_the_upstream_lacks_comes_back_as_the_upstreams_own_answer(passthrough_gateway: str, key: str) -> None:
    client = openai.OpenAI(
        base_url=f"{passthrough_gateway}/v1", api_key=UPSTREAM_KEY, default_headers={"x-api-key": key},
        max_retries=0, timeout=60,
    )
    with pytest.raises(openai.NotFoundError):
        client.files.list()
    direct = httpx.get(
        f"{passthrough_gateway}/v1/files", headers={"x-api-key": key, "authorization": f"Bearer {UPSTREAM_KEY}"}, timeout=30
    )
    assert direct.status_code == 404 and "x-request-id" in direct.headers


def test_with_the_servers_key_stored_objects_and_unmetered_routes_are_not_relayed(
    keyed_gateway: str, faults_gateway: str, key: str
) -> None:
    for gateway in (keyed_gateway, faults_gateway):
        for method, path in (("GET", "/v1/files"), ("DELETE", "/v1/files/file-abc"), ("POST", "/v1/completions"),
                             ("GET", "/v1/responses/resp_1"), ("POST", "/v1/audio/speech")):
            answer = httpx.request(method, f"{gateway}{path}", headers={"x-api-key": key}, timeout=30)
            assert answer.status_code == 403, (gateway, path)
            assert answer.json()["error"]["code"] == "route_not_available"


def test_multipart_and_query_arrive_byte_for_byte(relay_gateway: str, key: str) -> None:
    boundary = "ccproxy-test-boundary"
    audio = bytes(range(256)) * 64
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    answer = httpx.post(
        f"{relay_gateway}/v1/audio/transcriptions?timestamp_granularities=word", content=body, timeout=30,
        headers={
            "x-api-key": key, "authorization": f"Bearer {CALLER_PROVIDER_KEY}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
    )
    assert answer.status_code == 200, answer.text
    seen = answer.json()
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", "/v1/audio/transcriptions", "timestamp_granularities=word")
    assert seen["content_type"] == f"multipart/form-data; boundary={boundary}"
    assert (seen["sha256"], seen["length"]) == (hashlib.sha256(body).hexdigest(), len(body))
    assert seen["authorization"] == f"Bearer {CALLER_PROVIDER_KEY}"  # the caller's own provider key
    assert answer.headers["content-disposition"] == 'attachment; filename="seen.json"'
    listing = httpx.get(f"{relay_gateway}/v1/files?limit=2&flag&x=%20y", headers={"x-api-key": key}, timeout=30)
    assert listing.json()["query"] == "limit=2&flag&x=%20y"  # not re-encoded
    gone = httpx.delete(f"{relay_gateway}/v1/files/file-abc123/missing", headers={"x-api-key": key}, timeout=30)
    assert gone.status_code == 404 and gone.json()["method"] == "DELETE"  # the upstream's status, its body
    latin1 = httpx.get(  # a byte the upstream client cannot send: a 500 before
        f"{relay_gateway}/v1/files", timeout=30, headers={"x-api-key": key, "authorization": b"Bearer sk-\xe9"}
    )
    assert latin1.status_code == 400 and latin1.json()["error"]["code"] == "invalid_header"


def test_embeddings_write_a_usage_event_of_their_kind(faults_gateway: str, database_url: str) -> None:
    key = create_key({"CCPROXY_DATABASE_URL": database_url}, "passthrough-embeddings")
    client = openai.OpenAI(base_url=f"{faults_gateway}/v1", api_key=key, max_retries=0, timeout=30)
    result = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
    assert result.usage.prompt_tokens == 7
    [event] = wait_for_events(database_url, "passthrough-embeddings", 1)
    assert (event["kind"], event["model"], event["tokens_after"], event["completion_tokens"]) == (
        "embeddings", "text-embedding-3-small", 7, None,
    )


@pytest.mark.parametrize(
    "path", ["/v1/nonsense", "/v1/files/%2F..%2Fchat", "/v1/files/%2e%2e/x", "/v1/files//x", "/v1/" + "a" * 600]
)
def test_unknown_routes_and_path_tricks_are_an_openai_shaped_404(faults_gateway: str, key: str, path: str) -> None:
    answer = httpx.get(f"{faults_gateway}{path}", headers={"x-api-key": key}, timeout=30)
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "not_found" and path.rsplit("/", 1)[-1][:20] not in error["message"]


def test_a_hostile_model_on_a_relayed_route_is_a_400(faults_gateway: str, key: str) -> None:
    answer = httpx.post(
        f"{faults_gateway}/v1/embeddings", timeout=30,
        headers={"x-api-key": key, "content-type": "application/json"},
        content=json.dumps({"model": "m\u0000", "input": "x"}).encode(),
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"


def test_relayed_routes_need_a_key(faults_gateway: str) -> None:
    assert httpx.get(f"{faults_gateway}/v1/files", timeout=30).status_code == 401
