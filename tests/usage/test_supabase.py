"""ccproxy's schema as a Supabase project holds it (issue 19): Supabase's roles, its auth.jwt()
and its default grants reproduced on the local PostgreSQL 15, then supabase/migrations/ applied
in order, as `supabase db push` would. `anon` and `authenticated` see nothing of ccproxy's
tables; a customer's dashboard (`authenticated` with its account in the JWT's app_metadata)
reads its own hourly usage and no one else's; ccproxy itself starts on the migrated database
without applying anything again, and records usage."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from ccproxy.usage.store import PostgresStore
from tests.usage.conftest import ADMIN_URL, PgDatabases
from tests.usage.helpers import BASE, TABLES, make_event

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "supabase" / "migrations"

# What a new Supabase project has before any migration of ours (supabase/postgres's init
# scripts, abridged to what these tables meet): the API roles, auth.jwt(), and default
# privileges that give the API roles every table the `postgres` role creates in `public`.
SUPABASE_ROLES = (
    "DO $$ BEGIN CREATE ROLE anon NOLOGIN NOINHERIT; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    "DO $$ BEGIN CREATE ROLE authenticated NOLOGIN NOINHERIT; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    "DO $$ BEGIN CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
)
SUPABASE_DATABASE = (
    "CREATE SCHEMA auth",
    "CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$ SELECT coalesce("
    "nullif(current_setting('request.jwt.claim', true), ''), nullif(current_setting('request.jwt.claims', true), '')"
    ")::jsonb $$",
    "GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role",
    "GRANT EXECUTE ON FUNCTION auth.jwt() TO anon, authenticated, service_role",
    "GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role",
)


class _Rollback(Exception):
    pass


@pytest.fixture
def supabase_db(pg_databases: PgDatabases) -> Iterator[str]:
    import psycopg

    url = pg_databases.create()
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        for statement in SUPABASE_ROLES:
            admin.execute(statement)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SUPABASE_DATABASE:
            conn.execute(statement)
        for path in sorted(MIGRATIONS.glob("*.sql")):  # one transaction per file, as the CLI
            with conn.transaction():
                conn.execute(path.read_text(encoding="utf-8"))
    yield url


def _as(conn, role: str, claims: dict | None = None) -> None:  # type: ignore[no-untyped-def]
    conn.execute(f"SET LOCAL ROLE {role}")
    if claims is not None:
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))


def _refused(conn, sql: str) -> bool:  # type: ignore[no-untyped-def]
    """True when the role has no privilege for ``sql`` (a savepoint keeps the transaction usable)."""
    import psycopg

    try:
        with conn.transaction():
            conn.execute(sql)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def test_the_generated_migrations_match_ccproxys_own() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "supabase_migrations.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_ccproxy_starts_on_the_migrated_project_and_the_api_roles_see_only_what_they_should(supabase_db: str) -> None:
    import psycopg

    store = PostgresStore(supabase_db)
    store.migrate()  # recorded by the Supabase migrations: nothing to apply, nothing fails
    acme, other = store.ensure_account("acme"), store.ensure_account("other")
    assert store.write_events([make_event(acme), make_event(acme), make_event(other)]) == 3
    assert store.hourly(acme, BASE, BASE + timedelta(hours=1))[0].requests == 2
    store.close()

    with psycopg.connect(supabase_db, autocommit=True) as conn:
        applied = {row[0] for row in conn.execute("SELECT version FROM ccproxy_schema_migrations")}
        assert applied == {p.stem.split("_ccproxy_", 1)[1] for p in MIGRATIONS.glob("*_ccproxy_0*.sql")}

        for role, claims in (("anon", None), ("authenticated", None), ("authenticated", {"sub": "u1"})):
            with pytest.raises(_Rollback), conn.transaction():
                _as(conn, role, claims)
                for table in [*TABLES, "ccproxy_schema_migrations"]:
                    readable = table == "ccproxy_usage_hourly" and role == "authenticated"
                    if readable:  # granted, and row level security shows no row without the claim
                        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), (claims, table)
                    else:  # Supabase's default grant taken back: refused outright
                        assert _refused(conn, f"SELECT count(*) FROM {table}"), (role, table)
                raise _Rollback

        with pytest.raises(_Rollback), conn.transaction():
            _as(conn, "authenticated", {"sub": "u1", "app_metadata": {"ccproxy_account": acme}})
            rows = conn.execute("SELECT account_id, requests FROM ccproxy_usage_hourly").fetchall()
            assert rows == [(acme, 2)]  # its own account's hours, not `other`'s
            for table in set(TABLES) - {"ccproxy_usage_hourly"}:
                assert _refused(conn, f"SELECT count(*) FROM {table}"), table
            assert _refused(conn, "UPDATE ccproxy_usage_hourly SET requests = 0")  # read, never write
            raise _Rollback

        with pytest.raises(_Rollback), conn.transaction():
            # A claim in user_metadata (which users edit themselves) opens nothing.
            _as(conn, "authenticated", {"sub": "u2", "user_metadata": {"ccproxy_account": acme}})
            assert conn.execute("SELECT count(*) FROM ccproxy_usage_hourly").fetchone() == (0,)
            raise _Rollback
