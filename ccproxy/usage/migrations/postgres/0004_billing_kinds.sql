-- ccproxy schema 4: what complete billing needs (ccproxy/pricing.py, billing/).
-- Events: the upstream's cached prompt tokens and the usage kind ('chat', 'compress').
-- Hourly totals: one row per account, hour, key, model and kind, with the cached tokens, so
-- that the price table can be applied per model (billing) and per key (the spend cap).
-- Rows written before this migration keep key_id '' and model '' (priced by the default
-- row): the hourly table never knew their models, and rebuilding it from the events could
-- take long on a large table.
-- Ledger: the hourly columns a batch covered, per model and kind. Hours billed before this
-- migration billed tokens_after only, at one price: their completion tokens (and tokens
-- before compression) are marked covered here, so upgrading does not bill past hours a
-- second time under the new rules.
-- Batches: review_reason (held for a person, never re-sent automatically), and the priced
-- lines of each batch (the invoice items, or the parts of a meter event's value), stored so
-- that a resumed batch sends exactly what was planned, whatever the price table says now.
-- RLS as in 0003. Keep ';' out of literals (the runner splits on it).

ALTER TABLE ccproxy_usage_events ADD COLUMN cached_tokens integer;
ALTER TABLE ccproxy_usage_events ADD COLUMN kind text NOT NULL DEFAULT 'chat';

ALTER TABLE ccproxy_usage_hourly ADD COLUMN key_id text NOT NULL DEFAULT '';
ALTER TABLE ccproxy_usage_hourly ADD COLUMN model text NOT NULL DEFAULT '';
ALTER TABLE ccproxy_usage_hourly ADD COLUMN kind text NOT NULL DEFAULT 'chat';
ALTER TABLE ccproxy_usage_hourly ADD COLUMN cached_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE ccproxy_usage_hourly DROP CONSTRAINT ccproxy_usage_hourly_pkey;
ALTER TABLE ccproxy_usage_hourly ADD PRIMARY KEY (account_id, hour, key_id, model, kind);
-- The spend cap reads one key's rows of the current month.
CREATE INDEX ccproxy_usage_hourly_key_hour ON ccproxy_usage_hourly (key_id, hour);

ALTER TABLE ccproxy_billing_ledger ADD COLUMN model text NOT NULL DEFAULT '';
ALTER TABLE ccproxy_billing_ledger ADD COLUMN kind text NOT NULL DEFAULT 'chat';
ALTER TABLE ccproxy_billing_ledger ADD COLUMN tokens_before bigint NOT NULL DEFAULT 0;
ALTER TABLE ccproxy_billing_ledger ADD COLUMN cached_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE ccproxy_billing_ledger ADD COLUMN completion_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE ccproxy_billing_ledger DROP CONSTRAINT ccproxy_billing_ledger_tokens_after_check;
ALTER TABLE ccproxy_billing_ledger ADD CONSTRAINT ccproxy_billing_ledger_counts_check CHECK (
    tokens_before >= 0 AND tokens_after >= 0 AND cached_tokens >= 0 AND completion_tokens >= 0
);
ALTER TABLE ccproxy_billing_ledger DROP CONSTRAINT ccproxy_billing_ledger_pkey;
ALTER TABLE ccproxy_billing_ledger ADD PRIMARY KEY (account_id, hour, seq, model, kind);
UPDATE ccproxy_billing_ledger l
    SET completion_tokens = h.completion_tokens, tokens_before = h.tokens_before
    FROM ccproxy_usage_hourly h
    WHERE h.account_id = l.account_id AND h.hour = l.hour AND h.model = '' AND h.kind = 'chat'
      AND h.key_id = '' AND l.seq = (
        SELECT MIN(seq) FROM ccproxy_billing_ledger m
        WHERE m.account_id = l.account_id AND m.hour = l.hour
    );

ALTER TABLE ccproxy_billing_batches ADD COLUMN review_reason text;

-- One priced line of a batch: a model's (or compression's) token class over the batch's hours.
-- amount_minor: the invoice item's amount in cents (invoice-items), or NULL (meters, where
-- the batch's quantity is the sum of the lines' exact amounts in millionths, rounded once).
CREATE TABLE ccproxy_billing_lines (
    batch_id          text NOT NULL REFERENCES ccproxy_billing_batches (batch_id),
    line_no           integer NOT NULL CHECK (line_no >= 0),
    model             text NOT NULL,
    kind              text NOT NULL,
    token_class       text NOT NULL
        CHECK (token_class IN ('input', 'cached_input', 'output', 'compress')),
    priced_as         text NOT NULL,
    tokens            bigint NOT NULL CHECK (tokens >= 0),
    price_per_million text NOT NULL,
    amount_minor      bigint,
    stripe_object_id  text,
    PRIMARY KEY (batch_id, line_no)
);
ALTER TABLE ccproxy_billing_lines ENABLE ROW LEVEL SECURITY;
-- As 0003 does for every other table: RLS applies to the owner too, one policy for it.
ALTER TABLE ccproxy_billing_lines FORCE ROW LEVEL SECURITY;
CREATE POLICY ccproxy_service ON ccproxy_billing_lines TO CURRENT_USER USING (true) WITH CHECK (true);
REVOKE ALL ON ccproxy_billing_lines FROM PUBLIC;
