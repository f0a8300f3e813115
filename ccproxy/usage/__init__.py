"""Usage accounting: events, the durable outbox, the database store, and /usage reports."""
