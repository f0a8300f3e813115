"""Throwaway databases on the machine's real PostgreSQL 15 (127.0.0.1:5432, trust auth)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

SERVER = "postgresql://postgres@127.0.0.1:5432"


@contextmanager
def fresh_database(prefix: str = "ccproxy_test") -> Iterator[str]:
    """A new, empty database for the block; its URL is yielded, and it is dropped after."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{SERVER}/{name}"
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
