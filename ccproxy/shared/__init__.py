"""State every Gateway worker and replica shares through Redis (CCPROXY_REDIS_URL): the per-key
rate limits (`limits`), the stable-history memo (`memo`) and the dropped originals of lossless,
citation and sidecar modes (`retrieval`). Without Redis each worker keeps its
own, in memory, and nothing here is used."""
