"""Usage survives faults: the database stopping mid-burst, the gateway killed mid-burst.

Both use real parts: the machine's PostgreSQL is really stopped and started again, and the
gateway's whole process group really gets SIGKILL.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from harness.postgres import fresh_database
from harness.servers import bentoml_serve, create_key, free_port, kill_tree, running
from tests.e2e.conftest import UPSTREAM_KEY, gateway_env

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Name a colour."}]


def _postgres(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, *(["-m", "fast"] if action == "stop" else [])],
        check=True, timeout=60,
    )
    if action == "start":
        subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-t", "30"], check=True, timeout=40)


@pytest.fixture()
def postgres_restored() -> Iterator[Callable[[str], None]]:
    """Lets a test stop the server; whatever happens, it is running again afterwards."""
    yield _postgres
    if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]).returncode != 0:
        _postgres("start")


class Burst:
    """Sends ``total`` chat requests from ``concurrency`` threads and counts the answers."""

    def __init__(self, base: str, headers: dict[str, str], total: int, concurrency: int = 4) -> None:
        self.base, self.headers, self.total = base, headers, total
        self.answered: list[dict[str, str]] = []  # response headers of each 200
        self.failed = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(concurrency)
        self._futures = [self._pool.submit(self._one) for _ in range(total)]

    def _one(self) -> None:
        try:
            response = httpx.post(
                f"{self.base}/v1/chat/completions", headers=self.headers, timeout=60,
                json={"model": "smollm2-upstream", "messages": QUESTION, "max_tokens": 1},
            )
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        with self._lock:
            if ok:
                self.answered.append(dict(response.headers))
            else:
                self.failed += 1

    def wait_for(self, answered: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.answered) < answered and time.monotonic() < deadline:
            time.sleep(0.05)

    def finish(self) -> None:
        for future in self._futures:
            future.result(timeout=180)
        self._pool.shutdown()


def _poll(read: Callable[[], int], expected: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    value = read()
    while value < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        value = read()
    return value


def test_postgres_stopped_mid_burst_every_event_arrives_exactly_once(
    llama_upstream: str, remote_compressor: str, logs_dir: Path, tmp_path: Path,
    postgres_restored: Callable[[str], None],
) -> None:
    with fresh_database("ccproxy_outage") as database_url:
        key = create_key({"CCPROXY_DATABASE_URL": database_url}, "outage")
        env = {
            **gateway_env(llama_upstream, remote_compressor, database_url, tmp_path / "data"),
            "CCPROXY_KEY_CACHE_TTL_S": "600",  # a verified key keeps working through the outage
        }
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        headers = {"x-api-key": key, "authorization": f"Bearer {UPSTREAM_KEY}"}
        with running(bentoml_serve(port), probe_url=f"{base}/livez", log=logs_dir / "outage.log", env=env):
            burst = Burst(base, headers, total=40)
            burst.wait_for(8)
            postgres_restored("stop")
            burst.wait_for(32)
            answered_while_down = len(burst.answered)
            time.sleep(2)  # several flush attempts fail meanwhile
            postgres_restored("start")
            burst.finish()
            assert burst.failed == 0 and len(burst.answered) == 40
            assert answered_while_down >= 32

            def stored() -> int:
                with psycopg.connect(database_url) as db:
                    return db.execute("SELECT count(*) FROM ccproxy_usage_events").fetchone()[0]

            assert _poll(stored, 40, timeout_s=90) == 40
            time.sleep(1)  # a late duplicate would show up now
            with psycopg.connect(database_url) as db:
                events, after = db.execute(
                    "SELECT count(*), sum(tokens_after) FROM ccproxy_usage_events"
                ).fetchone()
                hourly_requests, hourly_after = db.execute(
                    "SELECT sum(requests), sum(tokens_after) FROM ccproxy_usage_hourly"
                ).fetchone()
        assert events == hourly_requests == 40
        assert after == hourly_after == sum(int(h["x-tokens-after"]) for h in burst.answered)


def _sqlite_gateway_env(upstream_url: str, compressor_url: str, data_dir: Path) -> dict[str, str]:
    """The SQLite default store; the flusher waits an hour, so only the outbox holds events."""
    return {
        "CCPROXY_UPSTREAM_URL": upstream_url,
        "CCPROXY_COMPRESSOR_URL": compressor_url,
        "CCPROXY_DATA_DIR": str(data_dir),
        "CCPROXY_USAGE_FLUSH_INTERVAL_S": "3600",
    }


def test_gateway_killed_mid_burst_loses_no_acknowledged_event(
    llama_upstream: str, remote_compressor: str, logs_dir: Path, tmp_path: Path
) -> None:
    """SQLite default store. The first gateway never flushes on its own (interval of an hour),
    so every event it acknowledged must come back from its outbox after the SIGKILL."""
    data_dir = tmp_path / "data"
    key = create_key({"CCPROXY_DATA_DIR": str(data_dir)}, "killed")
    env = _sqlite_gateway_env(llama_upstream, remote_compressor, data_dir)
    headers = {"x-api-key": key, "authorization": f"Bearer {UPSTREAM_KEY}"}
    concurrency = 4
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(bentoml_serve(port), probe_url=f"{base}/livez", log=logs_dir / "killed.log", env=env) as first:
        burst = Burst(base, headers, total=60, concurrency=concurrency)
        burst.wait_for(20)
        kill_tree(first)
        burst.finish()
    acknowledged = len(burst.answered)
    assert 20 <= acknowledged < 60 and burst.failed == 60 - acknowledged

    def stored() -> int:
        with sqlite3.connect(data_dir / "ccproxy.sqlite") as db:
            return db.execute("SELECT count(*) FROM ccproxy_usage_events").fetchone()[0]

    assert stored() == 0  # nothing reached the database before the kill
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    restarted = {**env, "CCPROXY_USAGE_FLUSH_INTERVAL_S": "0.2"}
    with running(bentoml_serve(port), probe_url=f"{base}/livez", log=logs_dir / "restarted.log", env=restarted):
        delivered = _poll(stored, acknowledged, timeout_s=60)
        time.sleep(1)
        delivered = stored()
        usage = httpx.get(f"{base}/usage", headers={"x-api-key": key}).json()
    # Requests in flight at the kill may have been recorded without being answered.
    assert acknowledged <= delivered <= acknowledged + concurrency
    assert usage["totals"]["requests"] == delivered


def test_a_graceful_stop_flushes_what_is_buffered(
    llama_upstream: str, remote_compressor: str, logs_dir: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    key = create_key({"CCPROXY_DATA_DIR": str(data_dir)}, "graceful")
    env = _sqlite_gateway_env(llama_upstream, remote_compressor, data_dir)  # only the shutdown flush delivers
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(bentoml_serve(port), probe_url=f"{base}/livez", log=logs_dir / "graceful.log", env=env):
        burst = Burst(base, {"x-api-key": key, "authorization": f"Bearer {UPSTREAM_KEY}"}, total=6)
        burst.finish()
    # running() ends with SIGTERM, BentoML's graceful stop.
    assert len(burst.answered) == 6
    with sqlite3.connect(data_dir / "ccproxy.sqlite") as db:
        assert db.execute("SELECT count(*) FROM ccproxy_usage_events").fetchone()[0] == 6
    with sqlite3.connect(data_dir / "usage-outbox.sqlite") as outbox:
        assert outbox.execute("SELECT count(*) FROM usage_outbox").fetchone()[0] == 0
