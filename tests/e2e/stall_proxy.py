"""A fault in front of a real Compressor: every call is passed through except ``POST /score``,
which is read and then held until the caller gives up (a Compressor that does not answer).

The hostile-input suite uses it so that the Gateway's whole compression path runs (segmenting,
counting, the scoring call, its timeout, failing open) without a real Compressor spending
minutes of CPU on bodies the Gateway has already given up on, which would load the machine
the probes are timed on.

    python -m tests.e2e.stall_proxy --port 8001 --target http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from tests.e2e.fault_upstream import _read_body

TARGET: dict[str, httpx.AsyncClient] = {}


async def _hold(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = await _read_body(receive)
    if scope["method"] == "POST" and scope["path"] == "/score":
        await _hold(receive)
        return
    headers: list[tuple[str, str]] = [
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k.lower() != b"host"
    ]
    reply = await TARGET["client"].request(
        scope["method"], scope["path"], params=scope["query_string"].decode(), headers=headers, content=body
    )
    out: Any = [(k.encode(), v.encode()) for k, v in reply.headers.items() if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")]
    await send({"type": "http.response.start", "status": reply.status_code, "headers": out})
    await send({"type": "http.response.body", "body": reply.content})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True)
    args = parser.parse_args()
    TARGET["client"] = httpx.AsyncClient(base_url=args.target, timeout=30)
    uvicorn.run(app, host="127.0.0.1", port=args.port, http="h11", log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
