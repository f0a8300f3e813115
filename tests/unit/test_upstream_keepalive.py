"""The upstream pool closes idle connections before the upstream does (CCPROXY_UPSTREAM_KEEPALIVE_S).

A real uvicorn server (what vLLM and LiteLLM serve with) that closes idle connections after
1 s, and counts the connections it is given: a request sent after our expiry but before the
server's must come on a new connection, so none is ever sent on one the server is closing at
that moment (the 502 `ReadError` seen in CI with httpx's default expiry, equal to uvicorn's).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from ccproxy.settings import Settings
from ccproxy.upstream import HttpUpstream

SERVER_IDLE_TIMEOUT_S = 1


def _counting_app(peers: set[tuple[str, int]]):
    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        peers.add(tuple(scope["client"]))
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    return app


@pytest.fixture
def server() -> Iterator[tuple[str, set[tuple[str, int]]]]:
    peers: set[tuple[str, int]] = set()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _counting_app(peers), log_level="warning", http="h11", timeout_keep_alive=SERVER_IDLE_TIMEOUT_S, lifespan="off"
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", peers
    instance.should_exit = True
    thread.join(timeout=5)


async def _two_requests(upstream: HttpUpstream, pause_s: float) -> None:
    for _ in range(2):
        reply = await upstream.chat_completions({"model": "m", "messages": []}, {}, stream=False)
        assert reply.status == 200
        await asyncio.sleep(pause_s)


def test_a_connection_idle_past_our_expiry_is_not_reused(server: tuple[str, set[tuple[str, int]]]) -> None:
    url, peers = server
    upstream = HttpUpstream(Settings(upstream_url=url, upstream_keepalive_s=0.5))
    asyncio.run(_two_requests(upstream, pause_s=0.8))  # past ours, before the server's 1 s
    assert len(peers) == 2


def test_a_connection_within_our_expiry_is_reused(server: tuple[str, set[tuple[str, int]]]) -> None:
    url, peers = server
    upstream = HttpUpstream(Settings(upstream_url=url, upstream_keepalive_s=0.5))
    asyncio.run(_two_requests(upstream, pause_s=0.1))
    assert len(peers) == 1


def test_the_default_expiry_is_below_the_common_five_second_server_timeout() -> None:
    # uvicorn's timeout_keep_alive, vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE and cpp-httplib's
    # keep-alive (llama-server) all default to 5 s.
    assert Settings().upstream_keepalive_s <= 4.0
