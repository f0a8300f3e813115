"""State every Gateway worker and replica shares through Redis (CCPROXY_REDIS_URL): the per-key
rate limits (`limits`) and the stable-history memo (`memo`). Without Redis each worker keeps its
own, in memory, and nothing here is used."""
