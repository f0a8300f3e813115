-- Supabase only (it names Supabase's `authenticated` role and its auth.jwt()): a customer's
-- dashboard reads its own account's hourly usage through Supabase's API, and nothing else.
-- The account comes from the JWT's app_metadata.ccproxy_account, which only the project's
-- service role can set (a user can edit user_metadata, never app_metadata): set it when the
-- user signs up, e.g. supabase.auth.admin.updateUserById(id, {app_metadata: {ccproxy_account: ...}}).
-- Supabase's default privileges gave anon and authenticated every privilege on these tables;
-- row level security already shows them no row, and taking the privileges back refuses them
-- outright (ccproxy's tables only: the project's other tables keep their grants).
REVOKE ALL ON ccproxy_schema_migrations, ccproxy_accounts, ccproxy_api_keys, ccproxy_usage_events,
    ccproxy_usage_hourly, ccproxy_usage_dead_letters, ccproxy_billing_batches, ccproxy_billing_ledger,
    ccproxy_billing_lines FROM anon, authenticated;
GRANT SELECT ON ccproxy_usage_hourly TO authenticated;
CREATE POLICY ccproxy_dashboard_own_usage ON ccproxy_usage_hourly
    FOR SELECT TO authenticated
    USING (account_id = (auth.jwt() -> 'app_metadata' ->> 'ccproxy_account'));
