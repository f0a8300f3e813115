"""A minimal, fast OpenAI-compatible upstream for load tests: canned answers, near-zero latency.

It stands where a real provider would (OpenAI, vLLM, …) so that a load test measures ccproxy's
own cost rather than a model's. It answers

- ``GET  /v1/models``            — one model, ``fast-upstream``;
- ``POST /v1/chat/completions``  — a canned answer, as JSON or as server-sent events
  (``stream: true``; a usage chunk when ``stream_options.include_usage`` is set, then
  ``data: [DONE]``), for whatever ``model`` was asked.

Usage figures are estimates (prompt: characters / 4; completion: canned), good enough for the
Gateway's accounting to run and cheap enough not to count. Any key is accepted. ``--delay-ms``
adds a fixed wait before the answer (and between streamed chunks) to mimic a slower model.

    python -m bench.fast_upstream --port 8900      # base URL: http://127.0.0.1:8900/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL_ID = "fast-upstream"
ANSWER_PIECES = ("The answer", " is in", " the documents", " you sent", ".")
ANSWER = "".join(ANSWER_PIECES)
COMPLETION_TOKENS = 9


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}},
        status_code=status,
    )


def _prompt_tokens(body: dict[str, Any]) -> int:
    chars = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    return chars // 4 + 1


def _usage(body: dict[str, Any]) -> dict[str, int]:
    prompt = _prompt_tokens(body)
    return {"prompt_tokens": prompt, "completion_tokens": COMPLETION_TOKENS, "total_tokens": prompt + COMPLETION_TOKENS}


def create_app(delay_s: float = 0.0) -> Starlette:
    async def models(_: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "ccproxy-bench"}]}
        )

    async def chat_completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "The body is not valid JSON.")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "'messages' is required.")
        model = str(body.get("model") or MODEL_ID)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if delay_s:
            await asyncio.sleep(delay_s)
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
                    ],
                    "usage": _usage(body),
                }
            )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""}, None)
            for piece in ANSWER_PIECES:
                if delay_s:
                    await asyncio.sleep(delay_s)
                yield chunk({"content": piece}, None)
            yield chunk({}, "stop")
            if include_usage:
                usage = {
                    "id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [], "usage": _usage(body),
                }
                yield b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait before answering and between chunks")
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(
        create_app(args.delay_ms / 1000), host=args.host, port=args.port,
        log_level="warning", access_log=False, lifespan="off",
    )


if __name__ == "__main__":
    main()
