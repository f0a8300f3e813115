-- ccproxy schema 2 for SQLite: the billing ledger, as in migrations/postgres/0002_billing.sql
-- (which explains the states). Timestamps are the store's fixed-format UTC text.
-- The runner (ccproxy/usage/migrate.py) splits this file on ';': keep ';' out of literals.

CREATE TABLE ccproxy_billing_batches (
    batch_id           TEXT PRIMARY KEY,
    mode               TEXT NOT NULL CHECK (mode IN ('meters', 'invoice-items')),
    account_id         TEXT NOT NULL,
    stripe_customer_id TEXT NOT NULL,
    period_start       TEXT NOT NULL,
    period_end         TEXT NOT NULL,
    quantity           INTEGER NOT NULL CHECK (quantity > 0),
    amount_minor       INTEGER,
    currency           TEXT NOT NULL,
    meter_event_name   TEXT,
    state              TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'rejected')),
    stripe_object_id   TEXT,
    stripe_invoice_id  TEXT,
    last_error         TEXT,
    created_at         TEXT NOT NULL,
    sent_at            TEXT
);
CREATE INDEX ccproxy_billing_batches_pending ON ccproxy_billing_batches (created_at)
    WHERE state = 'pending';

CREATE TABLE ccproxy_billing_ledger (
    account_id   TEXT NOT NULL,
    hour         TEXT NOT NULL,
    seq          INTEGER NOT NULL CHECK (seq >= 0),
    tokens_after INTEGER NOT NULL CHECK (tokens_after > 0),
    batch_id     TEXT NOT NULL REFERENCES ccproxy_billing_batches (batch_id),
    PRIMARY KEY (account_id, hour, seq)
);
CREATE INDEX ccproxy_billing_ledger_batch ON ccproxy_billing_ledger (batch_id);
CREATE INDEX ccproxy_billing_ledger_hour ON ccproxy_billing_ledger (hour);
