from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ccproxy.usage.migrate import load_migrations, split_statements
from ccproxy.usage.store import PostgresStore, SqliteStore, SqlStore
from tests.usage.helpers import TABLES, pg_query, sqlite_query

FreshFactory = tuple[str, Callable[[], SqlStore], Callable[[str], list[tuple[Any, ...]]]]


def _versions(query: Callable[[str], list[tuple[Any, ...]]]) -> list[str]:
    return [row[0] for row in query("SELECT version FROM ccproxy_schema_migrations ORDER BY 1")]


def test_both_dialects_have_the_same_migrations() -> None:
    sqlite = [m.version for m in load_migrations("sqlite")]
    postgres = [m.version for m in load_migrations("postgres")]
    assert sqlite == postgres and sqlite[0] == "0001_init"


def test_split_statements_drops_comments() -> None:
    sql = "-- a; comment\nCREATE TABLE a (x int); -- trailing\n\nCREATE INDEX i ON a (x);\n"
    assert split_statements(sql) == ["CREATE TABLE a (x int)", "CREATE INDEX i ON a (x)"]


def test_migrate_is_idempotent(fresh_store_factory: FreshFactory) -> None:
    _, new_store, query = fresh_store_factory
    store = new_store()
    for _ in range(3):
        store.migrate()
    new_store().migrate()
    assert _versions(query) == [m.version for m in load_migrations("sqlite")]
    assert store.count_events() == 0


def test_concurrent_migrations_apply_each_file_once(fresh_store_factory: FreshFactory) -> None:
    _, new_store, query = fresh_store_factory
    stores = [new_store() for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def run(store: SqlStore) -> None:
        try:
            barrier.wait()
            store.migrate()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert _versions(query) == [m.version for m in load_migrations("sqlite")]


def test_every_postgres_table_forces_rls_with_one_policy_for_the_migrating_role(pg_url: str) -> None:
    query = pg_query(pg_url)
    tables = query(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind = 'r' ORDER BY 1"
    )
    names = [name for name, _, _ in tables]
    assert names == sorted([*TABLES, "ccproxy_schema_migrations"])
    assert all(rls and force for _, rls, force in tables), tables
    policies = query(
        "SELECT tablename, policyname, roles::text[] FROM pg_policies "
        "WHERE tablename LIKE 'ccproxy_%' ORDER BY 1"
    )
    # The migrations ran as postgres here (tests/usage/conftest.py); tests/usage/test_rls.py
    # runs them as an ordinary role.
    assert policies == [(name, "ccproxy_service", ["postgres"]) for name in names]
    assert query("SELECT count(*) FROM information_schema.role_table_grants "
                 "WHERE table_name LIKE 'ccproxy_%' AND grantee = 'PUBLIC'") == [(0,)]


def test_a_role_without_policies_sees_no_rows(pg_url: str) -> None:
    import psycopg

    store = PostgresStore(pg_url)
    store.ensure_account(f"owner-only-{uuid.uuid4().hex}")
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # One rolled-back transaction: the role exists only inside it.
        with pytest.raises(_Rollback), conn.transaction():
            conn.execute("CREATE ROLE ccproxy_test_anon NOLOGIN")
            conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO ccproxy_test_anon")
            conn.execute("SET LOCAL ROLE ccproxy_test_anon")
            for table in TABLES:
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
            raise _Rollback
        assert conn.execute("SELECT count(*) > 0 FROM ccproxy_accounts").fetchone() == (True,)


class _Rollback(Exception):
    pass


def test_sqlite_timestamps_are_fixed_format_utc_text(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    store.migrate()
    store.ensure_account("a")
    store.close()
    (created,) = sqlite_query(tmp_path / "db.sqlite")("SELECT created_at FROM ccproxy_accounts")[0]
    assert len(created) == len("2024-05-01T10:00:00.000000Z") and created.endswith("Z")
