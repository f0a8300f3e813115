"""Load scenarios for ccproxy (locust); ``shapes`` builds the requests without importing locust."""
