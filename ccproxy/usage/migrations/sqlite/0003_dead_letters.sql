-- ccproxy schema 3 for SQLite: the usage dead letters, as in
-- migrations/postgres/0003_dead_letters.sql (which explains the columns; SQLite has no roles,
-- so none of its row level security). Timestamps are the store's fixed-format UTC text.
-- The runner (ccproxy/usage/migrate.py) splits this file on ';': keep ';' out of literals.

CREATE TABLE ccproxy_usage_dead_letters (
    letter_id   TEXT PRIMARY KEY,
    event_id    TEXT,
    account_id  TEXT,
    reason      TEXT NOT NULL,
    event       TEXT NOT NULL,
    event_chars INTEGER NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX ccproxy_usage_dead_letters_created ON ccproxy_usage_dead_letters (created_at)
