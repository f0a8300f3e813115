"""The PostgreSQL store on a psycopg_pool connection pool, for the request path.

`PostgresStore` holds one connection behind a lock, so a worker's key lookups and /usage reads
wait for each other (and for any slow one). Here each call borrows a connection from a pool
of up to `pool_size`, opened lazily and kept. The rules stay those of `SqlStore`: a read that
finds its connection broken (the server restarted) is tried again on another; a write is
retried only while nothing of it reached the server (BEGIN failed); every connection failure,
and waiting longer than the connect timeout for a free connection, is StoreUnavailable.

The flusher keeps a plain `PostgresStore`: it writes from one thread, and a pool would only
keep reconnecting in the background while the database is down.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ccproxy.usage.store import PostgresStore

T = TypeVar("T")


class PooledPostgresStore(PostgresStore):
    def __init__(self, url: str, pool_size: int = 4, connect_timeout_s: int = 5) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        super().__init__(url, connect_timeout_s)
        self.pool_size = pool_size
        self._pool: Any = None
        self._pool_lock = threading.Lock()

    def _the_pool(self) -> Any:
        with self._pool_lock:
            if self._pool is None:
                from psycopg_pool import ConnectionPool

                self._pool = ConnectionPool(
                    self._url,
                    # As PostgresStore._connect: autocommit, no server-side prepared statements.
                    kwargs={
                        "autocommit": True,
                        "prepare_threshold": None,
                        "connect_timeout": self._connect_timeout_s,
                        "application_name": "ccproxy",
                    },
                    min_size=1,
                    max_size=self.pool_size,
                    # How long a caller waits for a connection (a free one, or a new one the
                    # pool opens) before it is told StoreUnavailable.
                    timeout=self._connect_timeout_s,
                    name="ccproxy-store",
                    open=False,
                )
                self._pool.open(wait=False)
            return self._pool

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[Any]:
        """A connection from the pool, given back on exit: the pool drops a broken one and
        rolls back one left in a transaction."""
        pool = self._the_pool()
        try:
            conn = pool.getconn()
        except self._psycopg.OperationalError as exc:  # PoolTimeout is one
            raise self._unavailable(exc) from exc
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def _read(self, fn: Callable[[Any], T]) -> T:
        # A server restart breaks every idle connection: up to pool_size of them can fail
        # before a new one is opened.
        for attempt in range(self.pool_size + 1):
            try:
                with self._borrowed() as conn:
                    return fn(conn)
            except self._psycopg.OperationalError as exc:
                if attempt == self.pool_size:
                    raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    def _write(self, fn: Callable[[Any], T]) -> T:
        for attempt in range(self.pool_size + 1):
            with self._borrowed() as conn:
                try:
                    conn.execute(self._begin_sql)
                except self._psycopg.OperationalError as exc:
                    # Nothing of this transaction reached the server: another connection
                    # cannot write twice.
                    if attempt == self.pool_size:
                        raise self._unavailable(exc) from exc
                    continue
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except self._psycopg.OperationalError as exc:
                    # Begun: the commit's fate is unknown; the caller retries (idempotently).
                    raise self._unavailable(exc) from exc
                except BaseException:
                    with contextlib.suppress(Exception):
                        conn.execute("ROLLBACK")
                    raise
                return result
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
