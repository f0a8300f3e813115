-- ccproxy schema 5: the admin page's compression outcome mix (ccproxy/admin/) counts the events
-- of every account in a time range; the only index on created_at led with account_id.
-- Keep ';' out of literals (the runner splits on it).

CREATE INDEX ccproxy_usage_events_created ON ccproxy_usage_events (created_at)
