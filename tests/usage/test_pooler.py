"""ccproxy through a transaction pooler, as Supabase's port 6543 serves it (issue 19).

Debian's PgBouncer in `pool_mode = transaction` stands in for Supavisor: each transaction runs on
whichever server connection is free, so a statement prepared in one transaction is missing (or
already taken) in the next. ccproxy connects as a dedicated non-superuser role, migrates through
the pooler (its migration lock is transaction-scoped), and then records usage and looks up keys
from several threads at once, through the store the flusher uses and the pool the request path
uses. A control shows the pooler really is in transaction mode: psycopg's own prepared
statements break through it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from ccproxy.usage.pgpool import PooledPostgresStore
from ccproxy.usage.store import PostgresStore
from tests.usage.conftest import ADMIN_URL, PgDatabases
from tests.usage.helpers import BASE, free_port, make_event

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
THREADS = 4
ROUNDS = 12  # past psycopg's default prepare_threshold (5): a store that prepared would fail


def _pgbouncer_config(work: Path, port: int, users: list[str]) -> Path:
    from psycopg.conninfo import conninfo_to_dict

    server = conninfo_to_dict(ADMIN_URL)
    (work / "users.txt").write_text("".join(f'"{user}" ""\n' for user in users))
    config = work / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host={server.get('host', '127.0.0.1')} port={server.get('port', 5432)}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        # trust: the server behind it is trust-auth too; users.txt lists who may connect.
        f"auth_type = trust\nauth_file = {work / 'users.txt'}\n"
        "pool_mode = transaction\n"
        # One server connection per database and role: every client transaction shares it,
        # so a prepared statement left by one client collides with the next one's.
        "default_pool_size = 1\nmax_client_conn = 64\n"
        f"logfile = {work / 'pgbouncer.log'}\n"
    )
    return config


@pytest.fixture
def pooled_database(pg_databases: PgDatabases) -> Iterator[tuple[str, str]]:
    """(a database URL through PgBouncer as a dedicated role, the same database direct as admin)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if not Path(PGBOUNCER).exists():
        pytest.skip("pgbouncer is not installed (.ci/run installs Debian's)")
    direct = pg_databases.create()
    role = f"ccproxy_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
    with psycopg.connect(direct, autocommit=True) as conn:  # DEPLOY.md, Supabase step 2
        conn.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{role}"')
    # pgbouncer refuses to run as root; as postgres it must reach its files, so not under
    # pytest's work (private to root).
    work = Path(tempfile.mkdtemp(prefix="ccproxy-pgbouncer-"))
    work.chmod(0o755)
    port = free_port()
    config = _pgbouncer_config(work, port, [role, "postgres"])
    (work / "pgbouncer.log").touch()
    for name, mode in (("users.txt", 0o644), ("pgbouncer.ini", 0o644), ("pgbouncer.log", 0o666)):
        (work / name).chmod(mode)
    process = subprocess.Popen([PGBOUNCER, "-u", "postgres", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pooled = make_conninfo(direct, port=port, user=role)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(pooled, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    said = process.communicate()[0].decode(errors="replace")
                    raise RuntimeError(f"pgbouncer did not start: {said[-1000:]} {(work / 'pgbouncer.log').read_text()[-2000:]}")
                time.sleep(0.1)
        assert conninfo_to_dict(pooled)["port"] == str(port)
        yield pooled, direct
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
        with psycopg.connect(direct, autocommit=True) as conn:  # the role owns the tables
            conn.execute(f'DROP OWNED BY "{role}"')
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_the_pooler_is_in_transaction_mode(pooled_database: tuple[str, str]) -> None:
    """The control: psycopg's prepared statements (as a driver does by default) break through it."""
    import psycopg

    pooled, _ = pooled_database
    with psycopg.connect(pooled, autocommit=True) as first, psycopg.connect(pooled, autocommit=True) as second:
        first.execute("SELECT 1", prepare=True)  # prepares _pg3_0 on the one server connection
        with pytest.raises((psycopg.errors.DuplicatePreparedStatement, psycopg.errors.InvalidSqlStatementName)):
            second.execute("SELECT 1", prepare=True)  # the same name, the same server connection


def test_ccproxy_migrates_records_and_reads_through_the_transaction_pooler(pooled_database: tuple[str, str]) -> None:
    import psycopg

    pooled, direct = pooled_database
    flusher_store = PostgresStore(pooled)
    flusher_store.migrate()  # as the dedicated role, through the pooler
    flusher_store.migrate()  # a second start finds nothing left to apply
    account = flusher_store.ensure_account("acme")
    request_store = PooledPostgresStore(pooled, pool_size=THREADS)
    key_ids = [f"key{n}" for n in range(THREADS)]
    for key_id in key_ids:
        request_store.insert_key(key_id, account, "0" * 64, None)

    failures: list[BaseException] = []

    def worker(number: int) -> None:
        try:
            for _ in range(ROUNDS):
                assert flusher_store.write_events([make_event(account)]) == 1
                assert request_store.find_key(key_ids[number]) is not None
                request_store.hourly(account, BASE, BASE + timedelta(hours=1))
        except BaseException as exc:  # collected: a thread's assertion must fail the test
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    hours = request_store.hourly(account, BASE, BASE + timedelta(hours=1))
    assert sum(hour.requests for hour in hours) == THREADS * ROUNDS
    request_store.close()
    flusher_store.close()

    with psycopg.connect(direct, autocommit=True) as conn:  # it really went through the role
        owners = {row[0] for row in conn.execute(
            "SELECT tableowner FROM pg_tables WHERE tablename LIKE 'ccproxy_%'")}
        assert owners == {psycopg.conninfo.conninfo_to_dict(pooled)["user"]}
