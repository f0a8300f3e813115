"""Row level security with real roles: ccproxy's tables, migrated by an ordinary (non-superuser)
role as in production, are readable and writable by that role only. FORCE binds the owner too,
so its access rests on its policy; any other role, even one given every privilege (as
Supabase's default privileges give anon and authenticated), sees no row and writes none."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from ccproxy.usage.store import PostgresStore
from tests.usage.conftest import ADMIN_URL, PgDatabases
from tests.usage.helpers import BASE, TABLES, make_event


class _Rollback(Exception):
    pass


@pytest.fixture
def service_db(pg_databases: PgDatabases) -> Iterator[tuple[str, str, str]]:
    """(url as the service role, url as the superuser, the other role's name): a database owned
    by a fresh LOGIN role (no superuser, no BYPASSRLS) and a second role with no policy."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    suffix = uuid.uuid4().hex[:10]
    service, intruder, name = f"ccproxy_svc_{suffix}", f"ccproxy_intruder_{suffix}", f"ccproxy_rls_{suffix}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {service} LOGIN NOSUPERUSER NOBYPASSRLS")
        admin.execute(f"CREATE ROLE {intruder} NOLOGIN NOSUPERUSER NOBYPASSRLS")
        admin.execute(f'CREATE DATABASE "{name}" OWNER {service}')
    try:
        yield (
            make_conninfo(ADMIN_URL, dbname=name, user=service),
            make_conninfo(ADMIN_URL, dbname=name),
            intruder,
        )
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f"DROP ROLE IF EXISTS {intruder}")
            admin.execute(f"DROP ROLE IF EXISTS {service}")


def test_only_the_service_role_sees_or_writes_rows(service_db: tuple[str, str, str]) -> None:
    import psycopg

    service_url, admin_url, intruder = service_db
    store = PostgresStore(service_url)
    store.migrate()
    store.migrate()  # the role reads its own migration records back under FORCE
    account = store.ensure_account("acme")
    assert store.write_events([make_event(account), make_event(account)]) == 2
    assert store.hourly(account, BASE, BASE + timedelta(hours=1))[0].requests == 2
    store.close()

    with psycopg.connect(admin_url, autocommit=True) as conn:
        with pytest.raises(_Rollback), conn.transaction():
            # Every privilege, as Supabase's default privileges would give anon: still nothing.
            conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {intruder}")
            conn.execute(f"SET LOCAL ROLE {intruder}")
            for table in [*TABLES, "ccproxy_schema_migrations"]:
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(
                    "INSERT INTO ccproxy_accounts (id, name, created_at) VALUES ('x', 'x', now())"
                )
            raise _Rollback
        with pytest.raises(_Rollback), conn.transaction():
            # No grant at all (the migrations revoke PUBLIC's): refused outright.
            conn.execute(f"SET LOCAL ROLE {intruder}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("SELECT count(*) FROM ccproxy_usage_events")
            raise _Rollback


def test_force_binds_the_owner_to_its_policy(service_db: tuple[str, str, str]) -> None:
    """Without FORCE the owner would read every row whatever the policies say; with it, the
    owner's access is its policy: take the policy away and the owner sees nothing."""
    import psycopg

    service_url, _, _ = service_db
    store = PostgresStore(service_url)
    store.migrate()
    store.write_events([make_event("acct_a")])
    store.close()
    with psycopg.connect(service_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM ccproxy_usage_events").fetchone() == (1,)
        with pytest.raises(_Rollback), conn.transaction():
            conn.execute("DROP POLICY ccproxy_service ON ccproxy_usage_events")
            assert conn.execute("SELECT count(*) FROM ccproxy_usage_events").fetchone() == (0,)
            raise _Rollback
