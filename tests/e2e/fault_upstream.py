"""A misbehaving OpenAI-compatible upstream, for faults a real server will not produce on demand.

Run: ``python -m tests.e2e.fault_upstream --port N`` (uvicorn, h11). The request's ``model``
picks the behaviour, so a test selects a fault through the gateway without any side channel:

===========================  ==========================================================
``fault-hang-headers``       reads the request, then sends nothing (timeout before headers)
``fault-hang-mid-stream``    200 and the first chunk (SSE or JSON), then silence
``fault-429``                429 with Retry-After: 7, x-ratelimit-* and openai-organization/-project
``fault-500`` / ``-503``     that status with an OpenAI-shaped body (503 adds Retry-After)
``fault-reset-headers``      resets the TCP connection before any response byte
``fault-reset-mid-stream``   200 and the first chunk, then a TCP reset (SO_LINGER 0)
``fault-invalid-json``       200 ``application/json`` with a truncated JSON body
``fault-malformed-sse``      a stream with a non-JSON event and an invalid UTF-8 event
``fault-echo-auth``          401 whose body and ``openai-echo`` header repeat the credentials
``fault-gzip``               the normal answer, gzip-compressed when the request accepts gzip
``fault-slow``               the normal answer after 3 s
``<fault>:<label>``          the fault, with a model name of its own in the usage events
anything else                the normal answer, which carries the received body as
                             ``received`` so tests can see exactly what was forwarded
===========================  ==========================================================

Every answer has ``usage`` {prompt_tokens: 11, completion_tokens: 3} where it succeeds.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import socket
import struct
import time
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
HANG_S = 120.0
SLOW_S = 3.0


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(payload)}\n\n".encode()


def _usage_chunk(model: str) -> bytes:
    payload = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": int(time.time()),
               "model": model, "choices": [], "usage": USAGE}
    return f"data: {json.dumps(payload)}\n\n".encode()


UNREAD_BODY_BYTES = 5 << 19  # 2.5 MiB: above test_bad_input's 2 MiB limit


def _completion(model: str, received: Any) -> bytes:
    return json.dumps({
        "id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"},
                     "finish_reason": "stop"}],
        "usage": USAGE,
        "received": received,
    }).encode()


def _error(message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


async def _start(send: Send, status: int, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _whole(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _start(send, status, b"application/json", extra)
    await send({"type": "http.response.body", "body": body})


async def _part(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _begin_answer(send: Send, model: str, stream: bool) -> None:
    """A 200 whose body has started and not ended: the first chunk, or the head of the JSON."""
    if stream:
        await _start(send, 200, b"text/event-stream")
        await _part(send, _chunk(model, {"role": "assistant", "content": "Hel"}))
    else:
        await _start(send, 200, b"application/json")
        await _part(send, b'{"id": "chatcmpl-fault", "choices": [')


def _reset(receive: Receive) -> None:
    """Close the client's connection with a TCP RST. uvicorn passes its cycle's bound ``receive``
    to the app, and the cycle holds the transport; SO_LINGER 0 turns close into a reset."""
    transport = receive.__self__.transport  # type: ignore[attr-defined]
    sock: socket.socket = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _read_body(receive: Receive) -> bytes:
    # A bytearray: `bytes += chunk` copied the whole body on every chunk, a quadratic stall of
    # this stand-in's event loop on a 9 MB body, which the hostile-input suite's probes then
    # waited for and blamed on the Gateway.
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)


async def _normal(send: Send, model: str, body: dict[str, Any], stream: bool) -> None:
    if not stream:
        await _whole(send, 200, _completion(model, body))
        return
    await _start(send, 200, b"text/event-stream")
    await _part(send, _chunk(model, {"role": "assistant", "content": ""}))
    for word in ("Hello", " world"):
        await _part(send, _chunk(model, {"content": word}))
    await _part(send, _chunk(model, {}, finish="stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        await _part(send, _usage_chunk(model))
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def _gzipped(scope: Scope, send: Send, model: str, body: dict[str, Any], stream: bool) -> None:
    """The normal answer, gzip-compressed whenever the request accepts gzip, as a CDN or an
    nginx with `gzip_types text/event-stream` in front of an upstream does."""
    accepted = dict(scope["headers"]).get(b"accept-encoding", b"").decode("latin-1")
    if "gzip" not in accepted:
        await _normal(send, model, body, stream)
        return
    parts: list[bytes] = []

    async def collect(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], (b"content-encoding", b"gzip")]
            await send(message)
        else:
            parts.append(message.get("body", b""))

    await _normal(collect, model, body, stream)
    await send({"type": "http.response.body", "body": gzip.compress(b"".join(parts))})


async def _other_route(scope: Scope, send: Send, raw: bytes) -> None:
    """Routes ccproxy passes through. /embeddings answers as a provider does (with usage); any
    other route describes the request it received, so byte-exact forwarding can be checked."""
    headers = dict(scope["headers"])
    if scope["path"].endswith("/embeddings"):
        body = json.loads(raw)
        answer = {"object": "list", "model": body.get("model"), "data": [{"object": "embedding", "index": 0,
                  "embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 7, "total_tokens": 7}}
        await _whole(send, 200, json.dumps(answer).encode())
        return
    seen = {
        "method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode("latin-1"),
        "content_type": headers.get(b"content-type", b"").decode("latin-1"),
        "authorization": headers.get(b"authorization", b"").decode("latin-1"),
        "sha256": hashlib.sha256(raw).hexdigest(), "length": len(raw),
    }
    await _whole(send, 404 if scope["path"].endswith("/missing") else 200, json.dumps(seen).encode(),
                 [(b"content-disposition", b'attachment; filename="seen.json"')])


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    raw = await _read_body(receive)
    if not scope["path"].endswith(("/chat/completions", "/models")):
        await _other_route(scope, send, raw)
        return
    if scope["path"].endswith("/models"):
        models = {"object": "list", "data": [{"id": "fault-ok", "object": "model"}]}
        await _whole(send, 200, json.dumps(models).encode())
        return
    try:
        # The hostile-input suite's bodies (tests/e2e/test_hostile_input.py) are answered
        # without being read: parsing megabytes here would delay the probe requests sent beside
        # them, and the suite times the Gateway, not this stand-in. Smaller bodies are echoed.
        body = json.loads(raw) if len(raw) < UNREAD_BODY_BYTES else {"model": "fault-ok", "unread": len(raw)}
    except ValueError:
        await _whole(send, 400, _error("fault upstream: body is not JSON", "invalid_request_error"))
        return
    model = str(body.get("model", "")).partition(":")[0]  # "fault-429:label": a fault, labelled
    stream = body.get("stream") is True
    auth = dict(scope["headers"]).get(b"authorization", b"")

    if model == "fault-hang-headers":
        await asyncio.sleep(HANG_S)
    elif model == "fault-hang-mid-stream":
        await _begin_answer(send, model, stream)
        await asyncio.sleep(HANG_S)
    elif model == "fault-429":
        await _whole(send, 429, _error("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
                     [(b"retry-after", b"7"), (b"x-ratelimit-remaining-requests", b"0"),
                      (b"openai-organization", b"org-fault-upstream"), (b"openai-project", b"proj_fault_upstream")])
    elif model == "fault-gzip":
        await _gzipped(scope, send, model, body, stream)
    elif model in ("fault-500", "fault-503"):
        status = int(model[-3:])
        extra = [(b"retry-after", b"2")] if status == 503 else []
        await _whole(send, status, _error(f"fault upstream says {status}", "server_error"), extra)
    elif model == "fault-reset-headers":
        _reset(receive)
    elif model == "fault-reset-mid-stream":
        await _begin_answer(send, model, stream)
        await asyncio.sleep(0.3)  # let the first bytes reach the gateway before the reset
        _reset(receive)
    elif model == "fault-invalid-json":
        await _whole(send, 200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
    elif model == "fault-malformed-sse" and stream:
        await _start(send, 200, b"text/event-stream")
        await _part(send, _chunk(model, {"role": "assistant", "content": "Hello"}))
        await _part(send, b"data: {this is not json\n\n")
        await _part(send, b"data: \xff\xfe broken utf-8\n\n")
        await _part(send, _chunk(model, {"content": " world"}, finish="stop"))
        await _part(send, _usage_chunk(model))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    elif model == "fault-echo-auth":
        await _whole(send, 401, _error(f"Incorrect API key provided: {auth.decode('latin-1')}", "invalid_request_error",
                                       "invalid_api_key"), [(b"openai-echo", auth)])
    elif model == "fault-slow":
        await asyncio.sleep(SLOW_S)
        await _normal(send, model, body, stream)
    else:
        await _normal(send, model, body, stream)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Hung requests must not hold up the test session when the fixture stops the server.
    uvicorn.run(app, host="127.0.0.1", port=args.port, http="h11", log_level="warning", proxy_headers=False,
                timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
