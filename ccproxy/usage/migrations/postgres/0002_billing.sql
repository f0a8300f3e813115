-- ccproxy schema 2: the billing job's ledger (billing/ledger.py).
-- A batch is one report to Stripe: a meter event (one account-hour) or an invoice item plus
-- its invoice (one account, many hours). It is written as 'pending' before the first Stripe
-- call and turns 'sent' after the last, so a crash in between leaves it to be re-sent with the
-- same identifier and idempotency keys. 'rejected': Stripe refused it before creating anything;
-- its ledger rows are deleted so that the hours are billed again, and the batch stays as a record.
-- RLS on, no policies, as in 0001. Keep ';' out of literals (the runner splits on it).

CREATE TABLE ccproxy_billing_batches (
    batch_id           text PRIMARY KEY,
    mode               text NOT NULL CHECK (mode IN ('meters', 'invoice-items')),
    account_id         text NOT NULL,
    stripe_customer_id text NOT NULL,
    period_start       timestamptz NOT NULL,
    period_end         timestamptz NOT NULL,
    -- Tokens after compression: the meter event's value, the invoice item's quantity.
    quantity           bigint NOT NULL CHECK (quantity > 0),
    -- Invoice items only: the amount in the currency's minor unit. Meters: Stripe's price.
    amount_minor       bigint,
    currency           text NOT NULL,
    meter_event_name   text,
    state              text NOT NULL CHECK (state IN ('pending', 'sent', 'rejected')),
    -- Meters: the meter event's identifier. Invoice items: the invoice item's id.
    stripe_object_id   text,
    stripe_invoice_id  text,
    last_error         text,
    created_at         timestamptz NOT NULL,
    sent_at            timestamptz
);
CREATE INDEX ccproxy_billing_batches_pending ON ccproxy_billing_batches (created_at)
    WHERE state = 'pending';
ALTER TABLE ccproxy_billing_batches ENABLE ROW LEVEL SECURITY;

-- Which account-hours were billed, by which batch. seq 0 is an hour's first report; usage
-- recorded after it was billed is billed again as seq 1, 2, ... (only the difference).
CREATE TABLE ccproxy_billing_ledger (
    account_id   text NOT NULL,
    hour         timestamptz NOT NULL,
    seq          integer NOT NULL CHECK (seq >= 0),
    tokens_after bigint NOT NULL CHECK (tokens_after > 0),
    batch_id     text NOT NULL REFERENCES ccproxy_billing_batches (batch_id),
    PRIMARY KEY (account_id, hour, seq)
);
CREATE INDEX ccproxy_billing_ledger_batch ON ccproxy_billing_ledger (batch_id);
CREATE INDEX ccproxy_billing_ledger_hour ON ccproxy_billing_ledger (hour);
ALTER TABLE ccproxy_billing_ledger ENABLE ROW LEVEL SECURITY;
