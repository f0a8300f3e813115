-- ccproxy schema 1: accounts, API keys, usage events and their hourly totals.
-- Runs unchanged on Supabase: plain SQL, no extensions, timestamptz. Row level security is
-- enabled on every table with no policy, so PostgREST's anon/authenticated roles see nothing;
-- ccproxy connects as the owner (or the service role), which RLS does not restrict.
-- The runner (ccproxy/usage/migrate.py) splits this file on ';': keep ';' out of literals.

CREATE TABLE ccproxy_accounts (
    id                 text PRIMARY KEY,
    name               text NOT NULL UNIQUE,
    stripe_customer_id text,
    created_at         timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE ccproxy_accounts ENABLE ROW LEVEL SECURITY;

-- Only the SHA-256 of a key is stored; the check refuses anything that is not one.
CREATE TABLE ccproxy_api_keys (
    key_id     text PRIMARY KEY,
    account_id text NOT NULL REFERENCES ccproxy_accounts (id),
    key_hash   text NOT NULL CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    label      text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX ccproxy_api_keys_account ON ccproxy_api_keys (account_id);
ALTER TABLE ccproxy_api_keys ENABLE ROW LEVEL SECURITY;

-- No foreign key to accounts: an event that the database refused would sit in the outbox
-- forever and block the events behind it. Usage is recorded first and judged later.
CREATE TABLE ccproxy_usage_events (
    event_id          text PRIMARY KEY,
    account_id        text NOT NULL,
    key_id            text,
    model             text NOT NULL,
    tokens_before     integer NOT NULL,
    tokens_after      integer NOT NULL,
    tokens_saved      integer NOT NULL,
    prompt_tokens     integer,
    completion_tokens integer,
    compression       text NOT NULL,
    compression_ms    double precision NOT NULL,
    latency_ms        double precision NOT NULL,
    status            integer NOT NULL,
    stream            boolean NOT NULL,
    created_at        timestamptz NOT NULL
);
CREATE INDEX ccproxy_usage_events_account_created ON ccproxy_usage_events (account_id, created_at);
ALTER TABLE ccproxy_usage_events ENABLE ROW LEVEL SECURITY;

-- Maintained in the same transaction as the event inserts, from the newly inserted rows only.
CREATE TABLE ccproxy_usage_hourly (
    account_id        text NOT NULL,
    hour              timestamptz NOT NULL,
    requests          bigint NOT NULL,
    tokens_before     bigint NOT NULL,
    tokens_after      bigint NOT NULL,
    tokens_saved      bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, hour)
);
ALTER TABLE ccproxy_usage_hourly ENABLE ROW LEVEL SECURITY;
