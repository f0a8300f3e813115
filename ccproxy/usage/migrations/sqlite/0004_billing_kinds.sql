-- ccproxy schema 4: what complete billing needs; see postgres/0004_billing_kinds.sql for the
-- why. SQLite cannot change a primary key or drop a check in place, so the hourly totals and
-- the ledger are rebuilt (copied into a new table that takes the old one's name).

ALTER TABLE ccproxy_usage_events ADD COLUMN cached_tokens INTEGER;
ALTER TABLE ccproxy_usage_events ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat';

CREATE TABLE ccproxy_usage_hourly_0004 (
    account_id        TEXT NOT NULL,
    hour              TEXT NOT NULL,
    key_id            TEXT NOT NULL DEFAULT '',
    model             TEXT NOT NULL DEFAULT '',
    kind              TEXT NOT NULL DEFAULT 'chat',
    requests          INTEGER NOT NULL,
    tokens_before     INTEGER NOT NULL,
    tokens_after      INTEGER NOT NULL,
    tokens_saved      INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    updated_at        TEXT NOT NULL,
    PRIMARY KEY (account_id, hour, key_id, model, kind)
);
INSERT INTO ccproxy_usage_hourly_0004 (
    account_id, hour, requests, tokens_before, tokens_after, tokens_saved, prompt_tokens,
    completion_tokens, updated_at
) SELECT account_id, hour, requests, tokens_before, tokens_after, tokens_saved, prompt_tokens,
    completion_tokens, updated_at FROM ccproxy_usage_hourly;
DROP TABLE ccproxy_usage_hourly;
ALTER TABLE ccproxy_usage_hourly_0004 RENAME TO ccproxy_usage_hourly;
CREATE INDEX ccproxy_usage_hourly_key_hour ON ccproxy_usage_hourly (key_id, hour);

CREATE TABLE ccproxy_billing_ledger_0004 (
    account_id        TEXT NOT NULL,
    hour              TEXT NOT NULL,
    seq               INTEGER NOT NULL CHECK (seq >= 0),
    model             TEXT NOT NULL DEFAULT '',
    kind              TEXT NOT NULL DEFAULT 'chat',
    tokens_before     INTEGER NOT NULL DEFAULT 0 CHECK (tokens_before >= 0),
    tokens_after      INTEGER NOT NULL CHECK (tokens_after >= 0),
    cached_tokens     INTEGER NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
    completion_tokens INTEGER NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    batch_id          TEXT NOT NULL REFERENCES ccproxy_billing_batches (batch_id),
    PRIMARY KEY (account_id, hour, seq, model, kind)
);
INSERT INTO ccproxy_billing_ledger_0004 (account_id, hour, seq, tokens_after, batch_id)
    SELECT account_id, hour, seq, tokens_after, batch_id FROM ccproxy_billing_ledger;
DROP TABLE ccproxy_billing_ledger;
ALTER TABLE ccproxy_billing_ledger_0004 RENAME TO ccproxy_billing_ledger;
CREATE INDEX ccproxy_billing_ledger_batch ON ccproxy_billing_ledger (batch_id);
CREATE INDEX ccproxy_billing_ledger_hour ON ccproxy_billing_ledger (hour);
UPDATE ccproxy_billing_ledger SET (completion_tokens, tokens_before) = (
    SELECT h.completion_tokens, h.tokens_before FROM ccproxy_usage_hourly h
    WHERE h.account_id = ccproxy_billing_ledger.account_id
      AND h.hour = ccproxy_billing_ledger.hour
      AND h.model = '' AND h.kind = 'chat' AND h.key_id = ''
) WHERE seq = (
    SELECT MIN(m.seq) FROM ccproxy_billing_ledger m
    WHERE m.account_id = ccproxy_billing_ledger.account_id AND m.hour = ccproxy_billing_ledger.hour
) AND EXISTS (
    SELECT 1 FROM ccproxy_usage_hourly h
    WHERE h.account_id = ccproxy_billing_ledger.account_id
      AND h.hour = ccproxy_billing_ledger.hour
      AND h.model = '' AND h.kind = 'chat' AND h.key_id = ''
);

ALTER TABLE ccproxy_billing_batches ADD COLUMN review_reason TEXT;

CREATE TABLE ccproxy_billing_lines (
    batch_id          TEXT NOT NULL REFERENCES ccproxy_billing_batches (batch_id),
    line_no           INTEGER NOT NULL CHECK (line_no >= 0),
    model             TEXT NOT NULL,
    kind              TEXT NOT NULL,
    token_class       TEXT NOT NULL
        CHECK (token_class IN ('input', 'cached_input', 'output', 'compress')),
    priced_as         TEXT NOT NULL,
    tokens            INTEGER NOT NULL CHECK (tokens >= 0),
    price_per_million TEXT NOT NULL,
    amount_minor      INTEGER,
    stripe_object_id  TEXT,
    PRIMARY KEY (batch_id, line_no)
);
