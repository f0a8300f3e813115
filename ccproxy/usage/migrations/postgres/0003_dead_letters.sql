-- ccproxy schema 3: the usage dead letters, and row level security that binds the owner too.
-- The runner (ccproxy/usage/migrate.py) splits this file on ';': keep ';' out of literals.

-- Outbox rows that can never be stored (ccproxy/usage/deadletters.py): the flusher sets them
-- aside here so that the events behind them reach ccproxy_usage_events. `event` is the outbox
-- JSON with control characters escaped, cut to 16,384 characters (event_chars: its length
-- before the cut). `reason` is an error class and SQLSTATE, never a driver's message.
-- letter_id is the SHA-256 of the outbox row: a replayed dead letter is stored once.
CREATE TABLE ccproxy_usage_dead_letters (
    letter_id   text PRIMARY KEY,
    event_id    text,
    account_id  text,
    reason      text NOT NULL,
    event       text NOT NULL,
    event_chars integer NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX ccproxy_usage_dead_letters_created ON ccproxy_usage_dead_letters (created_at);
ALTER TABLE ccproxy_usage_dead_letters ENABLE ROW LEVEL SECURITY;

-- Row level security with no policy hid the rows from every other role but not from the
-- tables' owner, and nothing said which roles hold privileges. Now: FORCE makes the policies
-- apply to the owner as well, and one policy admits the role that runs these migrations (the
-- role ccproxy connects as; CURRENT_USER is resolved once, here). Every other role sees no row
-- and can write none, whatever privileges it is given later (Supabase's default privileges
-- give anon and authenticated all of them on new tables). Superusers and BYPASSRLS roles (as
-- Supabase's service_role) bypass row level security: this does not restrict them.
-- Privileges: none for PUBLIC; the owner holds all of them as owner.
ALTER TABLE ccproxy_schema_migrations FORCE ROW LEVEL SECURITY;
CREATE POLICY ccproxy_service ON ccproxy_schema_migrations TO CURRENT_USER USING (true) WITH CHECK (true);
REVOKE ALL ON ccproxy_schema_migrations FROM PUBLIC;

ALTER TABLE ccproxy_accounts FORCE ROW LEVEL SECURITY;
CREATE POLICY ccproxy_service ON ccproxy_accounts TO CURRENT_USER USING (true) WITH CHECK (true);
REVOKE ALL ON ccproxy_accounts FROM PUBLIC;

ALTER TABLE ccproxy_api_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY ccproxy_service ON ccproxy_api_keys TO CURRENT_USER USING (true) WITH CHECK (true);
REVOKE ALL ON ccproxy_api_keys FROM PUBLIC;

ALTER TABLE ccproxy_usage_events FORCE ROW LEVEL SECURITY;
CREATE POLICY ccproxy_service ON ccproxy_usage_events TO CURRENT_USER USING (true) WITH CHECK (true);
REVOKE ALL ON ccproxy_usage_events FROM PUBLIC;

ALTER TABLE ccproxy_usage_hourly FORCE ROW LEVEL SECURITY;
CREATE POLICY ccproxy_service ON ccproxy_usage_hourly TO CURRENT_USER USING (true) WITH CHECK (true);
REVOKE ALL ON ccproxy_usage_hourly FROM PUBLIC;

ALTER TABLE ccproxy_billing_batches FORCE ROW LEVEL SECURITY;
CREATE POLICY ccproxy_service ON ccproxy_billing_batches TO CURRENT_USER USING (true) WITH CHECK (true);
REVOKE ALL ON ccproxy_billing_batches FROM PUBLIC;

ALTER TABLE ccproxy_billing_ledger FORCE ROW LEVEL SECURITY;
CREATE POLICY ccproxy_service ON ccproxy_billing_ledger TO CURRENT_USER USING (true) WITH CHECK (true);
REVOKE ALL ON ccproxy_billing_ledger FROM PUBLIC;

ALTER TABLE ccproxy_usage_dead_letters FORCE ROW LEVEL SECURITY;
CREATE POLICY ccproxy_service ON ccproxy_usage_dead_letters TO CURRENT_USER USING (true) WITH CHECK (true);
REVOKE ALL ON ccproxy_usage_dead_letters FROM PUBLIC
