"""The Redis clients of CCPROXY_REDIS_URL, each call bounded by CCPROXY_REDIS_TIMEOUT_S (connect
and command): an asyncio one for the rate limits on the event loop, a synchronous one for the
memo and the originals, whose calls run in threads. Both connect on first use."""

from __future__ import annotations

from typing import Any

from ccproxy.settings import Settings


def _url(settings: Settings) -> str:
    if settings.redis_url is None:
        raise ValueError("CCPROXY_REDIS_URL is not set")
    return settings.redis_url.get_secret_value()


def async_client(settings: Settings) -> Any:
    """redis.asyncio.Redis, answers as str."""
    import redis.asyncio

    timeout = settings.redis_timeout_s
    return redis.asyncio.Redis.from_url(
        _url(settings), socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30,
        decode_responses=True,
    )


def sync_client(settings: Settings, *, text: bool) -> Any:
    """redis.Redis (thread-safe); answers as str when ``text``, else as bytes."""
    import redis

    timeout = settings.redis_timeout_s
    return redis.Redis.from_url(
        _url(settings), socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=text
    )
