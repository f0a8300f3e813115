"""The OpenAI-compatible HTTP API. Routes stay thin: parse, forward, relay.

The upstream is attached after construction (``app.state.upstream``) because BentoML builds
the app at import time and the upstream per worker, when the Gateway service starts.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccproxy.compression.gateway import ContextCompressor, compress_response, compression_headers
from ccproxy.protocol import (
    ProxyError,
    compression_control,
    error_body,
    parse_chat_request,
    parse_compress_request,
    sse_event,
)
from ccproxy.settings import Settings
from ccproxy.upstream import Upstream, UpstreamReply

logger = logging.getLogger("ccproxy")

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Gives every request an id (the caller's if it sent a sane one) and echoes it back.

    It also turns an unexpected exception into an OpenAI-shaped 500 that still carries the
    id, which Starlette's outermost error handler could not do.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _CLIENT_REQUEST_ID.match(sent) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in request %s", request_id)
            if response_started:
                raise
            response = JSONResponse(
                error_body(
                    "The server had an error while processing your request.", type="server_error"
                ),
                status_code=500,
            )
            await response(scope, receive, send_with_id)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` bytes."""
    too_large = ProxyError(
        413,
        f"Request body is larger than the limit of {limit} bytes.",
        code="request_too_large",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise too_large
    return bytes(received)


def _reply_response(reply: UpstreamReply) -> Response:
    return Response(
        content=reply.body,
        status_code=reply.status,
        media_type=reply.media_type,
        headers=reply.headers,
    )


async def _relay_events(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # The status line is already sent: a failure now can only be told inside the stream,
    # which the OpenAI SDKs surface as an APIError.
    try:
        async for event in events:
            yield event
    except ProxyError as exc:
        logger.warning("upstream stream broke: %s", exc.code)
        yield sse_event(exc.body())


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="ccproxy", docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json")
    app.add_middleware(RequestContextMiddleware)

    def upstream_of(request: Request) -> Upstream:
        upstream: Upstream | None = getattr(request.app.state, "upstream", None)
        if upstream is None:
            raise ProxyError(503, "The upstream is not configured yet.", type="server_error")
        return upstream

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            error_body(str(exc.detail), code=code), status_code=exc.status_code
        )

    def compressor_of(request: Request) -> ContextCompressor:
        compressor: ContextCompressor | None = getattr(request.app.state, "compressor", None)
        if compressor is None:
            raise ProxyError(503, "The compressor is not configured yet.", type="server_error")
        return compressor

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        raw = await read_body(request, settings.max_body_bytes)
        body, chat = parse_chat_request(raw)
        control, body = compression_control(request.headers, body)
        compressor = compressor_of(request)
        compression = await compressor.compress_or_original(body["messages"], compressor.plan(control))
        if compression.outcome == "compressed":
            body = {**body, "messages": compression.messages}
        extra_headers = compression_headers(compression)
        reply = await upstream_of(request).chat_completions(body, request.headers, bool(chat.stream))
        if reply.events is None:
            response = _reply_response(reply)
            response.headers.update(extra_headers)
            return response
        return StreamingResponse(
            _relay_events(reply.events),
            status_code=reply.status,
            media_type="text/event-stream",
            headers={
                **reply.headers,
                **extra_headers,
                "cache-control": "no-cache",
                "x-accel-buffering": "no",
            },
        )

    @app.post("/v1/compress")
    async def compress(request: Request) -> JSONResponse:
        raw = await read_body(request, settings.max_body_bytes)
        body, asked = parse_compress_request(raw)
        compressor = compressor_of(request)
        try:
            compression = await compressor.compress_as_asked(
                body["messages"], ratio=asked.ratio, budget_tokens=asked.budget
            )
        except Exception as exc:
            logger.warning("compress endpoint failed: %s", type(exc).__name__)
            raise ProxyError(
                503,
                "The compressor could not score this request; try again later.",
                type="server_error",
                code="compressor_unavailable",
            ) from None
        return JSONResponse(compress_response(compression))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return _reply_response(await upstream_of(request).models(request.headers))

    # BentoML hands a mounted app only the paths it has routes for; this one claims the rest
    # of /v1 so that unknown endpoints get an OpenAI-shaped 404 instead of plain text.
    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown_endpoint(request: Request, path: str) -> Response:
        raise ProxyError(404, f"Invalid URL ({request.method} /v1/{path})", code="not_found")

    return app
