"""Which store errors say "this row can never be stored" rather than "not now".

The flusher retries the second kind forever (with backoff) and sets rows of the first kind
aside in the dead-letter table, so one bad row cannot stop accounting. Unknown errors count as
"not now": retrying a good row costs a delay that the outbox-age alert reports, while setting a
good row aside would leave it unbilled until someone replays it.

Only the error's class and SQLSTATE leave this module, never its message: a driver's message
can quote the values it refused.
"""

from __future__ import annotations

import sqlite3

# SQLSTATE classes that depend on the row's values, not on the server, the schema or the role:
# 22 data exception (NUL in text, number out of range, bad encoding), 23 integrity constraint
# violation (NOT NULL, CHECK; duplicates never raise: inserts use ON CONFLICT DO NOTHING), 54
# program limit exceeded (an id too long for its index). Everything else (08 connection, 40
# serialization, 42 missing table or privilege, 53 resources, 57 shutdown) is retried.
_ROW_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})

# psycopg raises these without a SQLSTATE while adapting a parameter, before anything reaches
# the server: a NUL in a str (DataError), a value of a type it cannot send (ProgrammingError).
_CLIENT_SIDE_ROW_ERRORS = frozenset({"DataError", "ProgrammingError"})

# sqlite3: a CHECK or NOT NULL (IntegrityError), a value too big (DataError), a parameter of a
# type it cannot bind (ProgrammingError; InterfaceError before Python 3.12). OperationalError
# (locked, disk I/O) is the store's StoreUnavailable and is retried.
_SQLITE_ROW_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
)

# Raised while a row is turned into parameters (an int too large for SQLite, a count that is
# not a number): an event decoded from the outbox is plain JSON, and nothing checked its types.
_PYTHON_ROW_ERRORS = (OverflowError, TypeError, ValueError)


def _is_psycopg_error(exc: BaseException) -> bool:
    return any(cls.__module__.startswith("psycopg") for cls in type(exc).__mro__)


def rejection_reason(exc: BaseException) -> str | None:
    """`Class` or `Class:SQLSTATE` when `exc` says the rows written can never be stored;
    None when the write may succeed later."""
    name = type(exc).__name__
    if _is_psycopg_error(exc):
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate is None:
            is_row = any(cls.__name__ in _CLIENT_SIDE_ROW_ERRORS for cls in type(exc).__mro__)
            return name if is_row else None
        return f"{name}:{sqlstate}" if sqlstate[:2] in _ROW_SQLSTATE_CLASSES else None
    if isinstance(exc, _SQLITE_ROW_ERRORS + _PYTHON_ROW_ERRORS):
        return name
    return None


def undecodable_reason(exc: BaseException) -> str:
    """The reason for an outbox row that does not decode into a UsageEvent."""
    return f"undecodable:{type(exc).__name__}"
