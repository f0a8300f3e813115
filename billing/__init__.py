"""The billing job: usage rows (ccproxy_usage_hourly), priced per model and token class with the
price table (ccproxy/pricing.py) -> Stripe, via Billing Meters (one meter event per account-hour,
valued in millionths of the currency) or invoice items (one per model and token class, on a
finalized invoice per account and run).

    job.py            what to bill and the Stripe requests for it (pure)
    ledger.py         which account-hours were reported, when, with which Stripe ids (SQL)
    stripe_client.py  stripe-python (the official SDK) with our retry policy: 429, Retry-After
    runner.py         one run: resume pending batches, plan, send, report
    catalog.py        the meter, product, price, customers and subscriptions in Stripe
    __main__.py       the CLI, `python -m billing`
"""
