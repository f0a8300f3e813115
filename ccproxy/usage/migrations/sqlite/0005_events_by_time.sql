-- ccproxy schema 5 for SQLite, as in migrations/postgres/0005_events_by_time.sql: an index for
-- the admin page's outcome mix over every account's events in a time range.
-- The runner (ccproxy/usage/migrate.py) splits this file on ';': keep ';' out of literals.

CREATE INDEX ccproxy_usage_events_created ON ccproxy_usage_events (created_at)
