-- ccproxy schema 1 for SQLite; the same tables as migrations/postgres/0001_init.sql.
-- Timestamps are UTC text in one fixed format, 2024-05-01T13:00:00.000000Z, so that text
-- order is time order; the store writes every timestamp itself (no column defaults).
-- The runner (ccproxy/usage/migrate.py) splits this file on ';': keep ';' out of literals.

CREATE TABLE ccproxy_accounts (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    stripe_customer_id TEXT,
    created_at         TEXT NOT NULL
);

-- Only the SHA-256 of a key is stored; the check refuses anything that is not one.
CREATE TABLE ccproxy_api_keys (
    key_id     TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES ccproxy_accounts (id),
    key_hash   TEXT NOT NULL CHECK (length(key_hash) = 64 AND key_hash NOT GLOB '*[^0-9a-f]*'),
    label      TEXT,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX ccproxy_api_keys_account ON ccproxy_api_keys (account_id);

-- No foreign key to accounts: see the Postgres migration.
CREATE TABLE ccproxy_usage_events (
    event_id          TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL,
    key_id            TEXT,
    model             TEXT NOT NULL,
    tokens_before     INTEGER NOT NULL,
    tokens_after      INTEGER NOT NULL,
    tokens_saved      INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    compression       TEXT NOT NULL,
    compression_ms    REAL NOT NULL,
    latency_ms        REAL NOT NULL,
    status            INTEGER NOT NULL,
    stream            INTEGER NOT NULL CHECK (stream IN (0, 1)),
    created_at        TEXT NOT NULL
);
CREATE INDEX ccproxy_usage_events_account_created ON ccproxy_usage_events (account_id, created_at);

CREATE TABLE ccproxy_usage_hourly (
    account_id        TEXT NOT NULL,
    hour              TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    tokens_before     INTEGER NOT NULL,
    tokens_after      INTEGER NOT NULL,
    tokens_saved      INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    updated_at        TEXT NOT NULL,
    PRIMARY KEY (account_id, hour)
);
