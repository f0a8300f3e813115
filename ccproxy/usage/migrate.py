"""Applies the SQL files in migrations/<dialect>/ in name order, each exactly once.

The store calls `apply_pending` inside a write transaction that it opened (SQLite:
``BEGIN IMMEDIATE``, which already excludes every other writer; Postgres: ``BEGIN``), so the
files and their rows in ``ccproxy_schema_migrations`` commit together or not at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, Protocol

Dialect = Literal["sqlite", "postgres"]

MIGRATIONS_TABLE = "ccproxy_schema_migrations"

# Any constant shared by every ccproxy process works; this one is "ccpx" in ASCII.
_ADVISORY_LOCK_KEY = 0x63637078

_BOOTSTRAP: dict[Dialect, tuple[str, ...]] = {
    "sqlite": (
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
        "(version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
    ),
    "postgres": (
        # A transaction-scoped lock, because Supabase's transaction pooler may hand the next
        # statement outside a transaction to another server connection: a session lock
        # could be taken on one connection and never released on it.
        f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK_KEY})",
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
        "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        f"ALTER TABLE {MIGRATIONS_TABLE} ENABLE ROW LEVEL SECURITY",
    ),
}

_PLACEHOLDER: dict[Dialect, str] = {"sqlite": "?", "postgres": "%s"}


class Connection(Protocol):
    """What sqlite3 and psycopg connections have in common and this module uses."""

    def execute(self, sql: str, params: Any = ..., /) -> Any: ...


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    def statements(self) -> list[str]:
        return split_statements(self.sql)


def load_migrations(dialect: Dialect) -> list[Migration]:
    folder = resources.files("ccproxy.usage").joinpath("migrations").joinpath(dialect)
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(entry.name.removesuffix(".sql"), entry.read_text("utf-8")) for entry in files]


def split_statements(sql: str) -> list[str]:
    """Statements of a migration file: `--` comments dropped, split on `;`.

    Deliberately simple (both drivers then run one statement per call); migration files keep
    `;` and `--` out of string literals.
    """
    without_comments = re.sub(r"--[^\n]*", "", sql)
    return [part.strip() for part in without_comments.split(";") if part.strip()]


def apply_pending(conn: Connection, dialect: Dialect, applied_at: Any) -> list[str]:
    """Apply the migrations not yet recorded; returns their versions. Call inside a transaction."""
    for statement in _BOOTSTRAP[dialect]:
        conn.execute(statement)
    done = {row[0] for row in conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE}").fetchall()}
    applied: list[str] = []
    p = _PLACEHOLDER[dialect]
    for migration in load_migrations(dialect):
        if migration.version in done:
            continue
        for statement in migration.statements():
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} (version, applied_at) VALUES ({p}, {p})",
            (migration.version, applied_at),
        )
        applied.append(migration.version)
    return applied
