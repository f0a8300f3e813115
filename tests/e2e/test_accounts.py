"""Accounts through the served gateway: keys, exact token counts, usage rows and /usage.

The gateways here keep accounts and usage in a fresh database on the real PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import openai
import psycopg
import pytest

from harness.servers import ccproxy_cli, create_key
from tests.e2e.chat_corpus import varied_chats
from tests.e2e.conftest import UPSTREAM_KEY
from tests.e2e.usage_db import wait_for_events

pytestmark = pytest.mark.e2e

MODEL = "smollm2-upstream"


def _chat(base: str, headers: dict[str, str], **body) -> httpx.Response:
    request = {"model": MODEL, "max_tokens": 1, "temperature": 0, **body}
    return httpx.post(f"{base}/v1/chat/completions", json=request, headers=headers, timeout=120)


def test_keys_are_created_listed_revoked_and_only_hashed(
    keyed_gateway: str, database_url: str
) -> None:
    env = {"CCPROXY_DATABASE_URL": database_url}
    key = create_key(env, "key-lifecycle")
    key_id = key.split("_")[1]
    listed = json.loads(ccproxy_cli(["--json", "keys", "list", "--account", "key-lifecycle"], env))
    assert [(row["key_id"], row["revoked_at"]) for row in listed] == [(key_id, None)]
    assert key not in json.dumps(listed)

    with psycopg.connect(database_url) as db:
        dump = "\n".join(str(row) for row in db.execute("SELECT * FROM ccproxy_api_keys").fetchall())
        stored_hash = db.execute("SELECT key_hash FROM ccproxy_api_keys WHERE key_id = %s", (key_id,)).fetchone()[0]
    assert key not in dump and key[17:] not in dump  # neither the key nor its secret part
    assert stored_hash == hashlib.sha256(key.encode()).hexdigest()

    client = openai.OpenAI(base_url=f"{keyed_gateway}/v1", api_key=key, max_retries=0)
    assert client.models.list().data
    ccproxy_cli(["keys", "revoke", key_id], env)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.code == "revoked_api_key"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"x-api-key": "ccp_0123456789ab_" + "A" * 43}, "invalid_api_key"),
        ({"x-api-key": "not-a-key"}, "invalid_api_key"),
    ],
)
def test_requests_without_a_valid_key_get_an_openai_shaped_401(
    passthrough_gateway: str, headers: dict[str, str], code: str
) -> None:
    for response in (
        _chat(passthrough_gateway, headers, messages=[{"role": "user", "content": "hi"}]),
        httpx.get(f"{passthrough_gateway}/v1/models", headers=headers),
        httpx.get(f"{passthrough_gateway}/usage", headers=headers),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == code
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_counted_prompt_tokens_match_the_upstream_within_two(passthrough_gateway: str, api_key: str) -> None:
    """100 varied chats: the count streamed in the headers (ours, before the upstream answers)
    against the upstream's own usage.prompt_tokens for the same request."""
    headers = {"x-api-key": api_key, "authorization": f"Bearer {UPSTREAM_KEY}", "x-compression": "off"}
    misses, differences = [], []
    for index, messages in enumerate(varied_chats(100)):
        whole = _chat(passthrough_gateway, headers, messages=messages)
        assert whole.status_code == 200, whole.text
        upstream_prompt_tokens = whole.json()["usage"]["prompt_tokens"]
        assert int(whole.headers["x-tokens-after"]) == upstream_prompt_tokens
        with httpx.stream(
            "POST", f"{passthrough_gateway}/v1/chat/completions", headers=headers, timeout=120,
            json={"model": MODEL, "max_tokens": 1, "messages": messages, "stream": True},
        ) as streamed:
            counted = int(streamed.headers["x-tokens-after"])
            assert int(streamed.headers["x-tokens-before"]) - counted == int(streamed.headers["x-tokens-saved"])
            streamed.read()
        differences.append(abs(counted - upstream_prompt_tokens))
        if differences[-1] > 2:
            misses.append((index, counted, upstream_prompt_tokens))
    print(f"100 chats: max |counted - upstream prompt_tokens| = {max(differences)}")
    assert not misses, f"(chat, counted, upstream) beyond ±2: {misses}"


def test_usage_rows_and_the_usage_endpoint_add_up(
    passthrough_gateway: str, database_url: str, rag_messages: list[dict]
) -> None:
    account = "usage-adds-up"
    key = create_key({"CCPROXY_DATABASE_URL": database_url}, account)
    headers = {"x-api-key": key, "authorization": f"Bearer {UPSTREAM_KEY}"}
    responses = [
        _chat(passthrough_gateway, headers, messages=rag_messages),  # compressed (over the threshold)
        _chat(passthrough_gateway, {**headers, "x-compression": "off"}, messages=rag_messages),
        _chat(passthrough_gateway, headers, messages=[{"role": "user", "content": "Say hi."}]),
    ]
    with httpx.stream(
        "POST", f"{passthrough_gateway}/v1/chat/completions", headers=headers, timeout=120,
        json={"model": MODEL, "max_tokens": 2, "messages": rag_messages, "stream": True},
    ) as streamed:
        streamed.read()
    assert [r.status_code for r in responses] == [200, 200, 200] and streamed.status_code == 200
    assert responses[0].headers["x-compression"] == "compressed" and int(responses[0].headers["x-tokens-saved"]) > 0
    for response in [*responses, streamed]:
        before, after, saved = (int(response.headers[f"x-tokens-{k}"]) for k in ("before", "after", "saved"))
        assert before - after == saved >= 0
        assert float(response.headers["x-ccproxy-overhead-ms"]) >= 0
    for response in responses:  # ccproxy's own time is part of what the caller waited
        assert float(response.headers["x-ccproxy-overhead-ms"]) < 1000 * response.elapsed.total_seconds()

    events = wait_for_events(database_url, account, 4, timeout_s=60)
    assert len(events) == 4
    whole_answers = sorted(int(r.headers["x-tokens-after"]) for r in responses)
    assert sorted(e["tokens_after"] for e in events if not e["stream"]) == whole_answers
    assert all(e["status"] == 200 and e["key_id"] == key.split("_")[1] for e in events)
    assert not any("Say hi" in json.dumps(e, default=str) for e in events)  # no message text

    usage = httpx.get(f"{passthrough_gateway}/usage", headers={"x-api-key": key}, params={"granularity": "day"})
    assert usage.status_code == 200, usage.text
    report = usage.json()
    totals = report["totals"]
    assert report["account"] == account
    assert totals["requests"] == 4
    for field in ("tokens_before", "tokens_after", "tokens_saved"):
        assert totals[field] == sum(e[field] for e in events)
    assert totals["tokens_before"] - totals["tokens_after"] == totals["tokens_saved"] > 0
    assert totals["savings_percent"] == pytest.approx(100 * totals["tokens_saved"] / totals["tokens_before"], abs=0.01)
    assert sum(bucket["requests"] for bucket in report["series"]) == 4
    # The operator's view from the command line: the same report from the same rows.
    from_cli = json.loads(ccproxy_cli(["usage", "--account", account, "--granularity", "day", "--json"],
                                      {"CCPROXY_DATABASE_URL": database_url}))
    assert from_cli["account"] == account and from_cli["totals"] == totals


def test_usage_endpoint_rejects_a_bad_range(passthrough_gateway: str, api_key: str) -> None:
    for params in ({"from": "yesterday-ish"}, {"granularity": "minute"}):
        response = httpx.get(f"{passthrough_gateway}/usage", headers={"x-api-key": api_key}, params=params)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
