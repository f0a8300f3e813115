"""Soak: sustained load through the Gateway while PostgreSQL is restarted in the middle.

Counts what matters: client requests that failed, and usage events lost or doubled — every
answered request must have exactly one row in the database once the outbox has drained. Runs
the short-chat load (compression off, so the CPU scorer is not the bottleneck) against the fast
upstream, with accounts and usage in a fresh database on the machine's real PostgreSQL, which
is really stopped and started again (``pg_ctlcluster``) while the load runs.

Writes the section between ``<!-- soak:start -->`` and ``<!-- soak:end -->`` of
``docs/RELIABILITY.md``.

    .venv/bin/python -m bench.soak                  # ~2 minutes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import psycopg

from bench.load import REPO, default_scenarios, run_locust, serving, warm_up, write_section
from harness.postgres import fresh_database

RELIABILITY_MD = REPO / "docs" / "RELIABILITY.md"


def _postgres(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True, timeout=60)
    if action == "start":
        subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-t", "30"], check=True, timeout=40)


def _restart_later(after_s: float, down_s: float, log: list[str]) -> threading.Thread:
    def restart() -> None:
        time.sleep(after_s)
        log.append(f"stopped at {time.strftime('%H:%M:%S')}")
        _postgres("stop")
        time.sleep(down_s)
        _postgres("start")
        log.append(f"started at {time.strftime('%H:%M:%S')}")

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


def _events(database_url: str) -> tuple[int, int]:
    with psycopg.connect(database_url) as db:
        events, distinct = db.execute("SELECT count(*), count(DISTINCT event_id) FROM ccproxy_usage_events").fetchone()
        return int(events), int(distinct)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of the load")
    parser.add_argument("--restart-after", type=float, default=20, help="seconds into the load")
    parser.add_argument("--down", type=float, default=8, help="seconds the database stays down")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)

    scenario = next(s for s in default_scenarios(1) if s.name == "chat-gateway")
    scenario = replace(scenario, name="soak", seconds=args.seconds)
    restarts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ccproxy-soak-") as tmp, fresh_database("ccproxy_soak") as url:
        work = Path(tmp)
        (work / "data").mkdir()
        try:
            with serving(work, work / "data", database_url=url) as stack:
                warm_up(stack.gateway, scenario, stack.api_key)
                restarter = _restart_later(args.restart_after, args.down, restarts)
                samples = run_locust(scenario, stack.gateway, stack.api_key, work)
                restarter.join(120)
                answered = 1 + sum(1 for s in samples if s["ok"])  # + the warm-up request
                failed = sum(1 for s in samples if not s["ok"])
                deadline = time.monotonic() + 120
                while _events(url)[0] < answered and time.monotonic() < deadline:
                    time.sleep(1)
                time.sleep(2)  # a late duplicate would show up now
                events, distinct = _events(url)
        finally:
            if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]).returncode != 0:
                _postgres("start")
    lost, doubled = max(0, answered - events), events - distinct + max(0, events - answered)
    section = f"""<!-- soak:start -->
## Soak: sustained load, database restarted in the middle

Command: `python -m bench.soak {' '.join(argv or [])}`. Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on
this 2-core machine: short chat through the Gateway (compression off) against the fast upstream,
4 users × 5 req/s for {args.seconds:g} s; accounts and usage in a fresh database on the real
PostgreSQL 15, stopped {args.restart_after:g} s into the load and started again {args.down:g} s later
({'; '.join(restarts)}).

| requests answered | client requests failed | usage events in the database | events lost | events doubled |
|---:|---:|---:|---:|---:|
| {answered} | {failed} | {events} | {lost} | {doubled} |

While the database was down, keys were verified from the Gateway's cache and usage waited in
the outbox; the flusher replayed it when the database came back.
<!-- soak:end -->
"""
    print(section)
    if not args.no_docs:
        write_section(section, RELIABILITY_MD, marks=("<!-- soak:start -->", "<!-- soak:end -->"))
    return 0 if failed == 0 and lost == 0 and doubled == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
