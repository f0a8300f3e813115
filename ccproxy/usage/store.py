"""Accounts, API keys and usage in SQL: an SQLite file by default, Postgres (Supabase) in
production.

`SqlStore` holds every query and the transaction and retry rules; `SqliteStore` and
`PostgresStore` only say how to connect, which placeholder the driver takes and how a
timestamp travels. The drivers are synchronous: async callers run these methods in a thread;
a lock serialises use of the one connection.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from ccproxy.usage import sqlitedb
from ccproxy.usage.events import (
    HOURLY_KEY_FIELDS,
    HOURLY_SUM_FIELDS,
    TOTAL_FIELDS,
    HourlyTotals,
    UsageEvent,
    as_utc,
    hour_of,
)
from ccproxy.usage.deadletters import DeadLetter
from ccproxy.usage.migrate import Dialect, apply_pending

if TYPE_CHECKING:
    from ccproxy.settings import Settings

T = TypeVar("T")

_EVENT_COLUMNS = tuple(f.name for f in fields(UsageEvent))
# One hourly row per account, hour, key, model and kind (migration 0004): what billing prices.
_HOURLY_COLUMNS = ("account_id", "hour", *HOURLY_KEY_FIELDS, *HOURLY_SUM_FIELDS, "updated_at")
# Rows per multi-row statement: 15 parameters x 500 rows stays far below both drivers' limits.
_ROWS_PER_STATEMENT = 500
_KEY_SELECT = (
    "SELECT k.key_id, k.account_id, a.name, k.key_hash, k.label, k.created_at, k.revoked_at "
    "FROM ccproxy_api_keys k JOIN ccproxy_accounts a ON a.id = k.account_id"
)


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (or stayed busy) right now. Retry later.

    A write that raises this may or may not have committed (the reply can be lost after the
    commit); `write_events` is idempotent, so retrying it is always safe.
    """


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    stripe_customer_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    account_id: str
    account_name: str
    key_hash: str
    label: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class UsageStore(Protocol):
    def migrate(self) -> None: ...
    def write_events(self, events: Sequence[UsageEvent]) -> int: ...
    def write_dead_letters(self, letters: Sequence[DeadLetter]) -> int: ...
    def hourly(self, account_id: str, start: datetime, end: datetime) -> list[HourlyTotals]: ...
    def event_totals(self, account_id: str, start: datetime, end: datetime) -> HourlyTotals: ...
    def count_events(self, event_ids: Sequence[str] | None = None) -> int: ...
    def ensure_account(self, name: str) -> str: ...
    def account_by_name(self, name: str) -> Account | None: ...
    def insert_key(
        self, key_id: str, account_id: str, key_hash: str, label: str | None
    ) -> None: ...
    def find_key(self, key_id: str) -> KeyRecord | None: ...
    def list_keys(self, account_name: str | None = None) -> list[KeyRecord]: ...
    def revoke_key(self, key_id: str) -> bool: ...
    def close(self) -> None: ...


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _hourly_sums(events: Sequence[UsageEvent]) -> dict[tuple[Any, ...], list[int]]:
    sums: dict[tuple[Any, ...], list[int]] = {}
    for e in events:
        key = (e.account_id, hour_of(e.created_at), *e.hourly_key())
        row = sums.setdefault(key, [0] * len(HOURLY_SUM_FIELDS))
        for i, value in enumerate(e.hourly_counts()):
            row[i] += value
    return sums


class SqlStore(ABC):
    """Every query once, written with `?` placeholders; a dialect swaps the placeholder."""

    dialect: ClassVar[Dialect]
    _placeholder: ClassVar[str]
    _begin_sql: ClassVar[str] = "BEGIN"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: Any = None

    # --- what a dialect supplies ------------------------------------------------------------
    @abstractmethod
    def _connect(self) -> Any:
        """A new connection in autocommit mode: transactions are opened with explicit BEGIN."""

    @abstractmethod
    def _unavailable_errors(self) -> tuple[type[Exception], ...]: ...

    @abstractmethod
    def _integrity_errors(self) -> tuple[type[Exception], ...]: ...

    @abstractmethod
    def _ts(self, value: datetime) -> Any:
        """A timestamp as the driver should receive it."""

    @abstractmethod
    def _dt(self, value: Any) -> datetime:
        """A timestamp as the driver returned it, as an aware UTC datetime."""

    # --- connection, transactions, retries ----------------------------------------------------
    def _q(self, sql: str) -> str:
        return sql if self._placeholder == "?" else sql.replace("?", self._placeholder)

    def _marks(self, rows: int, columns: int) -> str:
        row = "(" + ", ".join([self._placeholder] * columns) + ")"
        return ", ".join([row] * rows)

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Closing a broken connection may fail; it is gone either way.
            with contextlib.suppress(Exception):
                conn.close()

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        lines = str(exc).strip().splitlines()
        detail = f": {lines[0]}" if lines else ""
        return StoreUnavailable(f"{self.dialect} unavailable ({type(exc).__name__}{detail})")

    def _read(self, fn: Callable[[Any], T]) -> T:
        """Run a read; when a kept connection turns out broken (the server restarted), the
        read is tried once more on a new one. A failure on a new connection is final."""
        with self._lock:
            while True:
                kept = self._conn is not None
                try:
                    return fn(self._connection())
                except self._unavailable_errors() as exc:
                    self._discard()
                    if not kept:
                        raise self._unavailable(exc) from exc

    def _write(self, fn: Callable[[Any], T]) -> T:
        """Run `fn` in one transaction. Once it has begun, a lost connection is not retried
        here (the commit's fate is unknown): StoreUnavailable tells the caller to retry later."""
        with self._lock:
            conn = self._begin()
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except self._unavailable_errors() as exc:
                self._discard()
                raise self._unavailable(exc) from exc
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except Exception:
                    self._discard()
                raise
            return result

    def _begin(self) -> Any:
        while True:
            kept = self._conn is not None
            try:
                conn = self._connection()
                conn.execute(self._begin_sql)
                return conn
            except self._unavailable_errors() as exc:
                # Nothing of this transaction reached the server, so when a kept connection
                # proves broken here, a try on a new one cannot write twice.
                self._discard()
                if not kept:
                    raise self._unavailable(exc) from exc

    def close(self) -> None:
        with self._lock:
            self._discard()

    # --- schema ------------------------------------------------------------------------------
    def migrate(self) -> None:
        now = self._ts(datetime.now(timezone.utc))
        self._write(lambda conn: apply_pending(conn, self.dialect, now))

    # --- usage -------------------------------------------------------------------------------
    def _event_row(self, e: UsageEvent) -> list[Any]:
        row = [getattr(e, name) for name in _EVENT_COLUMNS]
        row[_EVENT_COLUMNS.index("created_at")] = self._ts(e.created_at)
        return row

    def write_events(self, events: Sequence[UsageEvent]) -> int:
        """Insert the events not yet stored and add exactly those to the hourly totals, in one
        transaction; returns how many were new. Replaying a batch changes nothing."""
        first: dict[str, UsageEvent] = {}
        for e in events:
            first.setdefault(e.event_id, e)
        # Sorted so that concurrent writers lock rows in one order (no deadlocks).
        batch = [first[event_id] for event_id in sorted(first)]
        if not batch:
            return 0
        insert = (
            f"INSERT INTO ccproxy_usage_events ({', '.join(_EVENT_COLUMNS)}) VALUES {{marks}} "
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
        )
        upsert = (
            f"INSERT INTO ccproxy_usage_hourly ({', '.join(_HOURLY_COLUMNS)}) VALUES {{marks}} "
            f"ON CONFLICT (account_id, hour, {', '.join(HOURLY_KEY_FIELDS)}) DO UPDATE SET "
            + ", ".join(
                f"{c} = ccproxy_usage_hourly.{c} + excluded.{c}" for c in HOURLY_SUM_FIELDS
            )
            + ", updated_at = excluded.updated_at"
        )

        def transaction(conn: Any) -> int:
            inserted: set[str] = set()
            for chunk in _chunks(batch, _ROWS_PER_STATEMENT):
                sql = insert.format(marks=self._marks(len(chunk), len(_EVENT_COLUMNS)))
                params = [value for e in chunk for value in self._event_row(e)]
                # RETURNING yields only the rows actually inserted, not the skipped duplicates.
                inserted.update(row[0] for row in conn.execute(sql, params).fetchall())
            new = [e for e in batch if e.event_id in inserted]
            now = self._ts(datetime.now(timezone.utc))
            rows = [
                (account_id, self._ts(hour), *key, *sums, now)
                for (account_id, hour, *key), sums in sorted(_hourly_sums(new).items())
            ]
            for chunk_rows in _chunks(rows, _ROWS_PER_STATEMENT):
                sql = upsert.format(marks=self._marks(len(chunk_rows), len(_HOURLY_COLUMNS)))
                conn.execute(sql, [value for row in chunk_rows for value in row])
            return len(new)

        return self._write(transaction)

    def write_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Store outbox rows that can never be stored as events, in one transaction; returns
        how many were new (a letter already stored, by its letter_id, is skipped)."""
        columns = ("letter_id", "event_id", "account_id", "reason", "event", "event_chars")
        now = self._ts(datetime.now(timezone.utc))
        rows = [[getattr(letter, c) for c in columns] + [now] for letter in letters]
        insert = (
            f"INSERT INTO ccproxy_usage_dead_letters ({', '.join(columns)}, created_at) "
            "VALUES {marks} ON CONFLICT (letter_id) DO NOTHING RETURNING letter_id"
        )

        def transaction(conn: Any) -> int:
            new = 0
            for chunk in _chunks(rows, _ROWS_PER_STATEMENT):
                sql = insert.format(marks=self._marks(len(chunk), len(columns) + 1))
                params = [value for row in chunk for value in row]
                new += len(conn.execute(sql, params).fetchall())
            return new

        return self._write(transaction) if rows else 0

    def hourly(self, account_id: str, start: datetime, end: datetime) -> list[HourlyTotals]:
        """The account's hourly totals for the hours with start <= hour < end, oldest first
        (summed over the hour's keys, models and kinds)."""
        sums = ", ".join(f"SUM({c})" for c in TOTAL_FIELDS)
        sql = self._q(
            f"SELECT account_id, hour, {sums} FROM ccproxy_usage_hourly "
            "WHERE account_id = ? AND hour >= ? AND hour < ? "
            "GROUP BY account_id, hour ORDER BY hour"
        )
        params = (account_id, self._ts(start), self._ts(end))
        rows = self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [HourlyTotals(r[0], self._dt(r[1]), *(int(v) for v in r[2:])) for r in rows]

    def event_totals(self, account_id: str, start: datetime, end: datetime) -> HourlyTotals:
        """Sums over the raw events with start <= created_at < end (audits: compare with
        `hourly` over hour-aligned bounds). `hour` holds `start`."""
        sums = ", ".join(f"COALESCE(SUM({c}), 0)" for c in TOTAL_FIELDS[1:])
        sql = self._q(
            f"SELECT COUNT(*), {sums} FROM ccproxy_usage_events "
            "WHERE account_id = ? AND created_at >= ? AND created_at < ?"
        )
        params = (account_id, self._ts(start), self._ts(end))
        row = self._read(lambda conn: conn.execute(sql, params).fetchone())
        return HourlyTotals(account_id, as_utc(start), *(int(v) for v in row))

    def count_events(self, event_ids: Sequence[str] | None = None) -> int:
        """All stored events, or how many of `event_ids` are stored."""
        if event_ids is None:
            sql = "SELECT COUNT(*) FROM ccproxy_usage_events"
            return int(self._read(lambda conn: conn.execute(sql).fetchone()[0]))
        ids = sorted(set(event_ids))

        def count(conn: Any) -> int:
            total = 0
            for chunk in _chunks(ids, _ROWS_PER_STATEMENT):
                marks = ", ".join([self._placeholder] * len(chunk))
                sql = f"SELECT COUNT(*) FROM ccproxy_usage_events WHERE event_id IN ({marks})"
                total += int(conn.execute(sql, list(chunk)).fetchone()[0])
            return total

        return self._read(count) if ids else 0

    # --- accounts and keys -------------------------------------------------------------------
    def ensure_account(self, name: str) -> str:
        """The id of the account called `name`, created (as acct_<hex>) if there is none."""
        if not name:
            raise ValueError("account name must not be empty")
        insert = self._q(
            "INSERT INTO ccproxy_accounts (id, name, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING"
        )
        select = self._q("SELECT id FROM ccproxy_accounts WHERE name = ?")
        params = (f"acct_{secrets.token_hex(12)}", name, self._ts(datetime.now(timezone.utc)))

        def transaction(conn: Any) -> str:
            conn.execute(insert, params)
            return str(conn.execute(select, (name,)).fetchone()[0])

        return self._write(transaction)

    def account_by_name(self, name: str) -> Account | None:
        sql = self._q(
            "SELECT id, name, stripe_customer_id, created_at FROM ccproxy_accounts WHERE name = ?"
        )
        row = self._read(lambda conn: conn.execute(sql, (name,)).fetchone())
        return None if row is None else Account(row[0], row[1], row[2], self._dt(row[3]))

    def insert_key(self, key_id: str, account_id: str, key_hash: str, label: str | None) -> None:
        """Store a key's SHA-256 (lowercase hex); the key itself never reaches the database."""
        if not _is_sha256_hex(key_hash):
            raise ValueError("key_hash must be a SHA-256 digest in lowercase hex")
        sql = self._q(
            "INSERT INTO ccproxy_api_keys (key_id, account_id, key_hash, label, created_at) "
            "VALUES (?, ?, ?, ?, ?)"
        )
        params = (key_id, account_id, key_hash, label, self._ts(datetime.now(timezone.utc)))
        try:
            self._write(lambda conn: conn.execute(sql, params))
        except self._integrity_errors() as exc:
            raise ValueError(
                f"key {key_id!r} not stored: the key id exists or the account does not"
            ) from exc

    def _key(self, row: Sequence[Any]) -> KeyRecord:
        revoked = None if row[6] is None else self._dt(row[6])
        return KeyRecord(row[0], row[1], row[2], row[3], row[4], self._dt(row[5]), revoked)

    def find_key(self, key_id: str) -> KeyRecord | None:
        sql = self._q(f"{_KEY_SELECT} WHERE k.key_id = ?")
        row = self._read(lambda conn: conn.execute(sql, (key_id,)).fetchone())
        return None if row is None else self._key(row)

    def list_keys(self, account_name: str | None = None) -> list[KeyRecord]:
        """Every key (revoked ones too), or one account's, oldest first."""
        params: tuple[str, ...] = ()
        where = ""
        if account_name is not None:
            params, where = (account_name,), "WHERE a.name = ? "
        sql = self._q(f"{_KEY_SELECT} {where}ORDER BY k.created_at, k.key_id")
        rows = self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [self._key(row) for row in rows]

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a live key; False when there is no such key or it was already revoked."""
        sql = self._q(
            "UPDATE ccproxy_api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL"
        )
        params = (self._ts(datetime.now(timezone.utc)), key_id)
        return bool(self._write(lambda conn: conn.execute(sql, params).rowcount) > 0)


class SqliteStore(SqlStore):
    dialect = "sqlite"
    _placeholder = "?"
    # IMMEDIATE takes the write lock up front: two deferred transactions that both read and
    # then write would fail with SQLITE_BUSY instead of waiting for each other.
    _begin_sql = "BEGIN IMMEDIATE"
    # Fixed width, UTC, so that text order is time order in range queries.
    TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

    def __init__(self, path: Path | str, busy_timeout_s: float = 10.0) -> None:
        super().__init__()
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s

    def _connect(self) -> sqlite3.Connection:
        # FULL, unlike the outbox: events leave the outbox once this commit returns, so it must
        # survive a power cut too. One fsync per flushed batch, not per request.
        conn = sqlitedb.connect(self.path, busy_timeout_s=self._busy_timeout_s, synchronous="FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _unavailable_errors(self) -> tuple[type[Exception], ...]:
        return (sqlite3.OperationalError,)

    def _integrity_errors(self) -> tuple[type[Exception], ...]:
        return (sqlite3.IntegrityError,)

    def _ts(self, value: datetime) -> str:
        return as_utc(value).strftime(self.TIMESTAMP_FORMAT)

    def _dt(self, value: Any) -> datetime:
        return datetime.strptime(value, self.TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)


class PostgresStore(SqlStore):
    dialect = "postgres"
    _placeholder = "%s"

    def __init__(self, url: str, connect_timeout_s: int = 5) -> None:
        # Imported here so that an SQLite-only install works without the driver.
        import psycopg

        super().__init__()
        self._psycopg = psycopg
        self._url = url
        self._connect_timeout_s = connect_timeout_s

    def __repr__(self) -> str:  # never the URL: it carries the password
        return f"{type(self).__name__}()"

    def _connect(self) -> Any:
        return self._psycopg.connect(
            self._url,
            autocommit=True,
            # No server-side prepared statements: Supabase's transaction pooler hands each
            # transaction to any server connection, where a statement prepared on another
            # one does not exist.
            prepare_threshold=None,
            connect_timeout=self._connect_timeout_s,
            application_name="ccproxy",
        )

    def _unavailable_errors(self) -> tuple[type[Exception], ...]:
        return (self._psycopg.OperationalError,)

    def _integrity_errors(self) -> tuple[type[Exception], ...]:
        return (self._psycopg.IntegrityError,)

    def _ts(self, value: datetime) -> datetime:
        return as_utc(value)

    def _dt(self, value: Any) -> datetime:
        return as_utc(value)


def open_store(settings: Settings, pool_size: int = 0) -> UsageStore:
    """Postgres when CCPROXY_DATABASE_URL is set, else the SQLite file in the data directory.
    Connects lazily; call `migrate()` once at startup. `pool_size` > 0: Postgres through a
    connection pool of that size (ccproxy/usage/pgpool.py), for callers on many threads."""
    if settings.database_url is not None:
        if pool_size > 0:
            from ccproxy.usage.pgpool import PooledPostgresStore

            return PooledPostgresStore(settings.database_url.get_secret_value(), pool_size)
        return PostgresStore(settings.database_url.get_secret_value())
    return SqliteStore(Path(settings.data_dir) / "ccproxy.sqlite")
