"""Backends for the usage tests: an SQLite file per test, and a real PostgreSQL database
created for the session (CCPROXY_TEST_POSTGRES_URL, default the local trust-auth server)
and dropped at its end. Without a reachable server the Postgres cases are skipped."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ccproxy.usage.store import PostgresStore, SqliteStore, SqlStore
from tests.usage.helpers import TABLES, Query, pg_query, sqlite_query

ADMIN_URL = os.environ.get(
    "CCPROXY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


class PgDatabases:
    """Creates throwaway databases on the test server; drops them all at the end."""

    def __init__(self) -> None:
        import psycopg
        from psycopg.conninfo import make_conninfo

        self._psycopg = psycopg
        self._make_conninfo = make_conninfo
        self._admin().close()  # fail here, once, when there is no server
        self._names: list[str] = []

    def _admin(self) -> Any:
        return self._psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)

    def create(self) -> str:
        name = f"ccproxy_test_{uuid.uuid4().hex[:12]}"
        with self._admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        self._names.append(name)
        return str(self._make_conninfo(ADMIN_URL, dbname=name))

    def close(self) -> None:
        # A fresh connection: a test may have terminated server connections on purpose.
        with self._admin() as admin:
            for name in self._names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    try:
        databases = PgDatabases()
    except Exception as exc:  # no driver or no server: the Postgres cases cannot run here
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_URL}: {type(exc).__name__}")
    yield databases
    databases.close()


@pytest.fixture(scope="session")
def pg_url(pg_databases: PgDatabases) -> str:
    url = pg_databases.create()
    store = PostgresStore(url)
    store.migrate()
    store.close()
    return url


@dataclass
class Backend:
    name: str
    url: str  # the SQLite path or the Postgres conninfo
    store: SqlStore
    new_store: Callable[[], SqlStore]
    query: Query


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A migrated, empty store of each kind."""
    stores: list[SqlStore] = []
    if request.param == "sqlite":
        path = tmp_path / "ccproxy.sqlite"

        def new_store() -> SqlStore:
            stores.append(SqliteStore(path))
            return stores[-1]

        query = sqlite_query(path)
        url = str(path)
    else:
        url = request.getfixturevalue("pg_url")

        def new_store() -> SqlStore:
            stores.append(PostgresStore(url))
            return stores[-1]

        query = pg_query(url)
        query(f"TRUNCATE {', '.join(TABLES)}")
    store = new_store()
    store.migrate()
    yield Backend(request.param, url, store, new_store, query)
    for s in stores:
        s.close()


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, Callable[[], SqlStore], Query]]:
    """Stores on a database that no migration has touched yet."""
    stores: list[SqlStore] = []
    if request.param == "sqlite":
        path = tmp_path / "fresh.sqlite"
        factory: Callable[[], SqlStore] = lambda: SqliteStore(path)  # noqa: E731
        query = sqlite_query(path)
    else:
        url = request.getfixturevalue("pg_databases").create()
        factory = lambda: PostgresStore(url)  # noqa: E731
        query = pg_query(url)

    def tracked() -> SqlStore:
        stores.append(factory())
        return stores[-1]

    yield request.param, tracked, query
    for s in stores:
        s.close()
