"""Two Gateways and two Compressors behind a real load balancer (Debian's haproxy, round robin),
sharing PostgreSQL and a real redis-server, in front of llama.cpp's server:

- a key's request limit holds for the fleet, not per replica;
- a 20-turn chat whose requests alternate between the replicas is forwarded append-only (each
  request's compressed messages start with the previous request's, byte for byte), and old
  turns are scored once in all, not once per replica;
- an original that sidecar mode dropped on one replica is retrieved from either;
- a Gateway killed (SIGKILL) under load loses no usage event (its outbox is replayed when it
  comes back) and the other Gateway carries on;
- with Redis down, the fleet (`CCPROXY_REDIS_FAIL_MODE=open`) serves every request without the
  limits, and a Gateway set to `closed` refuses with 503 `rate_limiter_unavailable`, nothing else.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from harness.postgres import fresh_database
from harness.servers import bentoml_serve, create_key, free_port, haproxy, haproxy_config, kill_tree, running
from nqdata.items import load_records
from tests.e2e.conftest import COMPRESSOR_TOKEN, UPSTREAM_KEY, gateway_env
from tests.redis_server import redis_server

pytestmark = pytest.mark.e2e

REQUESTS_PER_MINUTE = 30


@dataclass
class Fleet:
    url: str  # the load balancer's Gateway frontend
    database_url: str
    redis_url: str
    compressor_urls: list[str]
    gateway_env: list[dict[str, str]]
    gateway_ports: list[int]
    logs: Path
    gateways: list[Any] = field(default_factory=list)  # the running processes
    stack: ExitStack = field(default_factory=ExitStack)

    def start_gateway(self, i: int) -> None:
        base = f"http://127.0.0.1:{self.gateway_ports[i]}"
        log = self.logs / f"replica-gateway{i}-{len(self.gateways)}.log"
        process = self.stack.enter_context(
            running(bentoml_serve(self.gateway_ports[i]), probe_url=f"{base}/livez", log=log, env=self.gateway_env[i])
        )
        if i < len(self.gateways):
            self.gateways[i] = process
        else:
            self.gateways.append(process)


@pytest.fixture(scope="module")
def fleet(llama_upstream: str, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed (Debian: apt-get install -y haproxy; .ci/run does)", pytrace=False)
    with ExitStack() as stack:
        database_url = stack.enter_context(fresh_database("ccproxy_replicas"))
        redis_url = stack.enter_context(redis_server(tmp_path_factory.mktemp("replica-redis")))
        compressor_ports = [free_port(), free_port()]
        for i, port in enumerate(compressor_ports):
            stack.enter_context(running(
                bentoml_serve(port, "service:Compressor"), probe_url=f"http://127.0.0.1:{port}/readyz",
                log=logs_dir / f"replica-compressor{i}.log", env={"CCPROXY_COMPRESSOR_TOKEN": COMPRESSOR_TOKEN},
            ))
        lb_gateway, lb_compressor = free_port(), free_port()
        gateway_ports = [free_port(), free_port()]
        config = haproxy_config(lb_gateway, gateway_ports, lb_compressor, compressor_ports)
        envs = []
        for i in range(2):
            env = gateway_env(
                llama_upstream, f"http://127.0.0.1:{lb_compressor}", database_url, logs_dir / f"replica{i}-data"
            )
            env.update(
                CCPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY, CCPROXY_REDIS_URL=redis_url,
                CCPROXY_RATE_LIMIT_REQUESTS_PER_MINUTE=str(REQUESTS_PER_MINUTE),
            )
            envs.append(env)
        fleet = Fleet(
            f"http://127.0.0.1:{lb_gateway}", database_url, redis_url,
            [f"http://127.0.0.1:{p}" for p in compressor_ports], envs, gateway_ports, logs_dir, stack=stack,
        )
        for i in range(2):
            fleet.start_gateway(i)
        stack.enter_context(haproxy(
            config, tmp_path_factory.mktemp("haproxy"), probe_url=f"{fleet.url}/livez", log=logs_dir / "haproxy.log"
        ))
        yield fleet


def _compress(fleet: Fleet, key: str, messages: list[dict[str, str]]) -> httpx.Response:
    return httpx.post(f"{fleet.url}/v1/compress", json={"messages": messages}, headers={"x-api-key": key}, timeout=300)


def test_a_keys_limit_holds_across_the_replicas(fleet: Fleet) -> None:
    key = create_key({"CCPROXY_DATABASE_URL": fleet.database_url}, "limited")
    tiny = [{"role": "user", "content": "Hello there."}]  # under the threshold: no scoring
    answers = [_compress(fleet, key, tiny) for _ in range(REQUESTS_PER_MINUTE + 6)]
    statuses = [a.status_code for a in answers]
    served_by = {a.headers.get("x-backend") for a in answers}
    assert served_by == {"gateway0", "gateway1"}
    # Per replica, each would admit 30: all 36 would pass. One bucket for the fleet admits 30
    # (plus what it refilled meanwhile, half a request a second).
    assert REQUESTS_PER_MINUTE <= statuses.count(200) <= REQUESTS_PER_MINUTE + 2, statuses
    assert set(statuses) == {200, 429}
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "retry-after" in refused.headers


def _turns(n: int) -> list[str]:
    """n user turns, each four Wikipedia passages and a question (~500 tokens)."""
    records = load_records("eval")
    turns = []
    for t in range(n):
        passages = [records[(4 * t + j) % len(records)].gold for j in range(4)]
        documents = "\n\n".join(p.render(j + 1) for j, p in enumerate(passages))
        turns.append(f"{documents}\n\nQuestion: {records[4 * t + 1].question}")
    return turns


def _score_calls(compressor_url: str) -> float:
    text = httpx.get(f"{compressor_url}/metrics", timeout=10).text
    calls = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("bentoml_service_request_total") and 'endpoint="/score"' in line
    ]
    assert calls, "the Compressor reports no /score requests metric"
    return sum(calls)


def test_a_chat_alternating_replicas_is_forwarded_append_only(fleet: Fleet) -> None:
    key = create_key({"CCPROXY_DATABASE_URL": fleet.database_url}, "chatty")
    calls_before = sum(_score_calls(url) for url in fleet.compressor_urls)
    history: list[dict[str, str]] = [{"role": "system", "content": "Answer from the documents."}]
    previous: list[str] = []
    served_by = []
    compressed = 0
    for n, turn in enumerate(_turns(20)):
        history.append({"role": "user", "content": turn})
        answer = _compress(fleet, key, history)
        assert answer.status_code == 200, answer.text
        served_by.append(answer.headers["x-backend"])
        body = answer.json()
        compressed += body["outcome"] == "compressed"
        forwarded = [json.dumps(m, sort_keys=True) for m in body["messages"]]
        # The previous request's messages, then only new ones (its question kept as it was).
        assert forwarded[: len(previous)] == previous, f"request {n + 1} changed what request {n} forwarded"
        previous = forwarded
        history.append({"role": "assistant", "content": f"Answer {n + 1}."})
    assert served_by[:4] in (["gateway0", "gateway1"] * 2, ["gateway1", "gateway0"] * 2)  # alternating
    assert compressed >= 15
    # Each turn is decided once for the fleet: the replica that did not decide a turn finds the
    # decision in Redis. A decision takes one scoring call, two when its best unit is kept in
    # part (its pieces are scored too), so at most 40 here. Apart, each replica would decide
    # again every turn the other decided: about 100 turns more over these 20 requests.
    scored = sum(_score_calls(url) for url in fleet.compressor_urls) - calls_before
    assert scored <= 2 * 20, scored
    memo_keys = redis.Redis.from_url(fleet.redis_url).keys("ccproxy:memo:*")
    assert len(memo_keys) >= compressed


def test_an_original_dropped_on_one_replica_is_retrieved_from_either(fleet: Fleet) -> None:
    """Sidecar mode with retrieval ids (LiteLLM's headroom contract): the originals live in Redis,
    so the id a replica wrote is answered by both."""
    key = create_key({"CCPROXY_DATABASE_URL": fleet.database_url}, "sidecar")
    rows = [{"role": "user", "content": turn} for turn in _turns(3)]
    answer = httpx.post(
        f"{fleet.url}/v1/compress", json={"messages": rows, "config": {"mode": "ccr"}},
        headers={"x-api-key": key}, timeout=300,
    )
    assert answer.status_code == 200, answer.text
    hashes = answer.json()["ccr_hashes"]
    assert hashes, answer.json()["outcome"]
    originals = {row["content"] for row in rows}
    served_by = set()
    for _ in range(2):  # round robin: one lookup on each replica
        found = httpx.get(f"{fleet.url}/v1/retrieve/{hashes[0]}", headers={"x-api-key": key}, timeout=30)
        assert found.status_code == 200 and found.json()["original_content"] in originals
        served_by.add(found.headers["x-backend"])
    assert served_by == {"gateway0", "gateway1"}


def _account_events(database_url: str, account: str) -> int:
    with psycopg.connect(database_url) as db:
        row = db.execute(
            "SELECT COUNT(*) FROM ccproxy_usage_events e JOIN ccproxy_accounts a ON a.id = e.account_id WHERE a.name = %s",
            (account,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_gateway_killed_under_load_loses_no_usage_and_the_other_carries_on(fleet: Fleet) -> None:
    key = create_key({"CCPROXY_DATABASE_URL": fleet.database_url}, "survivor")
    small = [{"role": "user", "content": "Short question?"}]

    kill_at: list[float] = []

    def send(i: int) -> tuple[float, int]:
        started = time.monotonic()
        try:
            return started, _compress(fleet, key, small).status_code
        except httpx.HTTPError:
            return started, 0  # a connection the killed replica held

    with ThreadPoolExecutor(3) as pool:
        before = [pool.submit(send, i) for i in range(9)]
        time.sleep(0.3)
        kill_tree(fleet.gateways[0])  # as an OOM kill or a node failure: no graceful stop
        kill_at.append(time.monotonic())
        after = [pool.submit(send, i) for i in range(15)]
        results = [f.result() for f in before + after]
    statuses = [status for _, status in results]
    later = [status for started, status in results if started > kill_at[0]]
    # haproxy routes around the dead one; if not, its log lines say how those requests ended.
    failed_lines = [line for line in (fleet.logs / "haproxy.log").read_text().splitlines() if " 502 " in line]
    assert len(later) >= 12 and later.count(200) == len(later), (statuses, failed_lines[-6:])
    answered = statuses.count(200)
    # Events of answered requests sit in the killed replica's outbox until it runs again.
    fleet.start_gateway(0)
    deadline = time.monotonic() + 60
    while _account_events(fleet.database_url, "survivor") < answered and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _account_events(fleet.database_url, "survivor") == answered


def test_haproxy_config_is_what_the_docs_show() -> None:
    """docs/DEPLOY.md's load-balancer example is this test's config (same directives)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "DEPLOY.md").read_text()
    example = haproxy_config(3000, [3001, 3002], 3100, [3101, 3102])
    for directive in (
        "balance roundrobin", "option httpchk GET /livez", "option redispatch 1", "retry-on conn-failure empty-response",
        "check inter 300 fall 2 rise 1",
    ):
        assert directive in example and directive in docs, directive
    assert re.search(r"CCPROXY_REDIS_URL", docs)


def _stop_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url).shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the server closed the connection as it went down
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.05)
    raise RuntimeError("redis-server is still up")


def test_with_redis_down_the_fleet_serves_and_a_fail_closed_gateway_refuses_with_503(fleet: Fleet) -> None:
    """Last in this module: it stops the fleet's redis-server. `open` (the fleet's setting) admits
    without the limits and keeps compressing on each worker's own memo; `closed` refuses with a
    503 in OpenAI's error shape. No other 5xx either way."""
    key = create_key({"CCPROXY_DATABASE_URL": fleet.database_url}, "redisless")
    _stop_redis(fleet.redis_url)
    tiny = [{"role": "user", "content": "Hello there."}]
    answers = [_compress(fleet, key, tiny) for _ in range(REQUESTS_PER_MINUTE + 6)]
    # With Redis up the fleet admitted 30 of these 36 (the first test); open, it admits all.
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert {a.headers.get("x-backend") for a in answers} == {"gateway0", "gateway1"}
    history: list[dict[str, str]] = []
    for n, turn in enumerate(_turns(4)):  # ~2,000 tokens: above the compression threshold
        history += [{"role": "user", "content": turn}, {"role": "assistant", "content": f"Answer {n + 1}."}]
    history.pop()
    compressed = _compress(fleet, key, history)
    assert compressed.status_code == 200 and compressed.json()["outcome"] == "compressed", compressed.text
    ccr = httpx.post(f"{fleet.url}/v1/compress", json={"messages": history, "config": {"mode": "ccr"}},
                     headers={"x-api-key": key}, timeout=300)
    assert ccr.status_code == 200, ccr.text
    for retrieval_id in ccr.json()["ccr_hashes"][:1] * 2:  # each replica: its own copy, or a 404
        found = httpx.get(f"{fleet.url}/v1/retrieve/{retrieval_id}", headers={"x-api-key": key}, timeout=30)
        assert found.status_code in (200, 404), found.text

    port = free_port()
    env = {**fleet.gateway_env[0], "CCPROXY_REDIS_FAIL_MODE": "closed",
           "CCPROXY_DATA_DIR": str(fleet.logs / "replica-closed-data")}
    base = f"http://127.0.0.1:{port}"
    with running(bentoml_serve(port), probe_url=f"{base}/livez", log=fleet.logs / "replica-closed.log", env=env):
        refused = httpx.post(f"{base}/v1/compress", json={"messages": tiny}, headers={"x-api-key": key}, timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "rate_limiter_unavailable"
        assert refused.headers["retry-after"] == "1"
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200  # Redis is not the upstream
