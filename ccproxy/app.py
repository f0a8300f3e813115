"""The OpenAI-compatible HTTP API. Routes stay thin: parse, forward, relay.

What the routes use is attached after construction (``app.state.parts``, ``.gate``,
``.store``) because BentoML builds the app at import time and those per worker, when the
Gateway service starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
import uuid
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccproxy.admin.serving import AdminApi
from ccproxy.auth import Authenticator, Principal
from ccproxy.chat import CHAT
from ccproxy.compress_endpoint import serve_compress, serve_retrieve
from ccproxy.demo import DemoApi, samples
from ccproxy.error_shapes import error_payload
from ccproxy.messages.serving import MESSAGES, count_tokens
from ccproxy.responses.serving import RESPONSES
from ccproxy.serving import Api, ChatParts, limit_key, serve_conversation
from ccproxy.limits import ConcurrencyLimitMiddleware
from ccproxy.logs import log_error
from ccproxy.metrics import ChatObserver, NoMetrics
from ccproxy.openapi import (
    CHAT_COMPLETIONS, COMPRESS, COUNT_TOKENS_ROUTE, MESSAGES_ROUTE, RESPONSES_ROUTE, RETRIEVE, USAGE,
)
from ccproxy.protocol import ProxyError, unknown_endpoint, usage_unavailable
from ccproxy.settings import Settings
from ccproxy.shared.limits import build_limiter
from ccproxy.passthrough import SERVER_KEY_RESOURCES, refused_with_server_key, relay, route_of
from ccproxy.upstream import RawCall, UpstreamReply
from ccproxy.usage.report import build_report, usage_window
from ccproxy.usage.store import UsageStore
from ccproxy.web import asset

logger = logging.getLogger("ccproxy")

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Cheap reads the concurrency cap leaves alone; every other /v1 route (the compressed APIs,
# /v1/compress and the relayed ones, whose uploads and downloads hold a worker too) is capped.
_UNCAPPED = frozenset({"/v1/models", "/v1/openapi.json"})


def is_capped(path: str) -> bool:
    return path.startswith("/v1/") and path not in _UNCAPPED


def exception_summary(exc: BaseException) -> str:
    """The exception's type and the frames it passed, without its message or source lines:
    messages can quote request content (a key, a bit of a prompt), and logs must hold neither."""
    frames = "".join(f"\n  {f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__))
    return f"{type(exc).__module__}.{type(exc).__qualname__} (message withheld){frames}"


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
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["received_at"] = time.perf_counter()  # x-ccproxy-overhead-ms counts from here
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
        except Exception as exc:
            logger.error("unhandled error in request %s: %s", request_id, exception_summary(exc))
            if response_started:
                # Re-raising would let the server log the exception, message and all; returning
                # leaves the response unfinished, which the server ends by closing the connection.
                return
            response = JSONResponse(
                error_payload(
                    scope["path"], 500, "The server had an error while processing your request.", type="server_error"
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
    # Joined once at the end: growing one buffer chunk by chunk copied it again and again on
    # the event loop (a 5.6 MB body arrives in hundreds of chunks).
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise too_large
    return b"".join(chunks)


def _reply_response(reply: UpstreamReply) -> Response:
    return Response(
        content=reply.body,
        status_code=reply.status,
        media_type=reply.media_type,
        headers=reply.headers,
    )


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def _log_error(request: Request, status: int, type_: str, code: str | None) -> None:
    # The route's template, never the raw path: a relayed path is the caller's text.
    route = getattr(request.scope.get("route"), "path", "unmatched")
    log_error(_request_id(request), route, status, type_, code)


def _state(request: Request, name: str) -> Any:
    value = getattr(request.app.state, name, None)
    if value is None:
        raise ProxyError(503, f"The {name} is not configured yet.", type="server_error")
    return value


def _client(request: Request) -> str | None:
    """The TCP peer's address: per-address budgets (failed auth, the demo) are kept by it."""
    return request.client.host if request.client else None


def _no_store(body: Any) -> JSONResponse:
    return JSONResponse(body, headers={"cache-control": "no-store"})


def _observer(app: FastAPI) -> ChatObserver:
    """The metrics of the wired parts; none before the service has wired them."""
    parts: ChatParts | None = getattr(app.state, "parts", None)
    return parts.metrics if parts is not None else NoMetrics()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="ccproxy", docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json")
    # Added first, so it runs inside the request-id middleware and its 503s carry the id too.
    app.add_middleware(
        ConcurrencyLimitMiddleware, cap=settings.max_concurrent_requests, limited=is_capped,
        on_refused=lambda: _observer(app).refused("overloaded"),
    )
    app.add_middleware(RequestContextMiddleware)
    # One per worker process: BentoML imports the service (and so builds this app) in each.
    limiter = build_limiter(
        settings, on_refused=lambda kind: _observer(app).refused(f"{kind}_per_minute"),
        on_unavailable=lambda: _observer(app).refused("rate_limiter_unavailable"),
    )

    async def principal_of(request: Request) -> Principal:
        gate: Authenticator = _state(request, "gate")
        return await gate.admit(request.headers, _client(request))

    async def admitted(request: Request) -> Principal:
        principal = await principal_of(request)
        await limiter.aadmit_request(limit_key(principal))
        return principal

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        _log_error(request, exc.status, exc.type, exc.code)
        body = error_payload(request.url.path, exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        _log_error(request, exc.status_code, "invalid_request_error", code)
        body = error_payload(request.url.path, exc.status_code, str(exc.detail), code=code)
        return JSONResponse(body, status_code=exc.status_code)

    async def conversation(api: Api[Any], request: Request) -> Response:
        principal = await admitted(request)
        raw = await read_body(request, settings.max_body_bytes)
        state = request.scope.get("state", {})
        return await serve_conversation(
            api, _state(request, "parts"), principal, request.headers, raw, state.get("request_id", ""),
            limiter=limiter, received_at=state.get("received_at"),
        )

    @app.post("/v1/chat/completions", openapi_extra=CHAT_COMPLETIONS)
    async def chat_completions(request: Request) -> Response:
        return await conversation(CHAT, request)

    @app.post("/v1/responses", openapi_extra=RESPONSES_ROUTE)
    async def responses(request: Request) -> Response:
        return await conversation(RESPONSES, request)

    @app.post("/v1/messages", openapi_extra=MESSAGES_ROUTE)
    async def messages(request: Request) -> Response:
        return await conversation(MESSAGES, request)

    @app.post("/v1/messages/count_tokens", openapi_extra=COUNT_TOKENS_ROUTE)
    async def messages_count_tokens(request: Request) -> Response:
        principal = await admitted(request)
        raw = await read_body(request, settings.max_body_bytes)
        return await count_tokens(_state(request, "parts"), principal, request.headers, raw)

    @app.post("/v1/compress", openapi_extra=COMPRESS)
    async def compress(request: Request) -> Response:
        principal = await admitted(request)
        raw = await read_body(request, settings.max_body_bytes)
        request_id = _request_id(request)
        return await serve_compress(_state(request, "parts"), principal, raw, request_id, limiter)

    # Sidecar mode's originals (docs/SIDECAR.md); declared before the catch-all /v1 route below.
    @app.get("/v1/retrieve/{ref}", openapi_extra=RETRIEVE)
    async def retrieve(request: Request) -> Response:
        principal = await admitted(request)
        # A store in Redis blocks on the network: read it in a thread.
        return await asyncio.to_thread(serve_retrieve, principal, request.path_params["ref"])

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        await principal_of(request)
        parts: ChatParts = _state(request, "parts")
        return _reply_response(await parts.upstream.models(request.headers))

    @app.get("/usage", openapi_extra=USAGE)
    async def usage(
        request: Request,
        start: str | None = Query(default=None, alias="from"),
        end: str | None = Query(default=None, alias="to"),
        granularity: str = "hour",
    ) -> JSONResponse:
        principal = await principal_of(request)
        if granularity not in ("hour", "day"):
            raise ProxyError(400, "granularity must be 'hour' or 'day'.", param="granularity")
        try:
            window = usage_window(start, end, granularity, datetime.now(timezone.utc))  # too long: a 400 now
        except ValueError as exc:
            raise ProxyError(400, str(exc), param="from") from None
        store: UsageStore = _state(request, "store")
        try:
            hours = await asyncio.to_thread(store.hourly, principal.account_id, *window)
        except Exception as exc:
            logger.warning("usage query failed: %s", type(exc).__name__)
            raise usage_unavailable() from None
        report = build_report(hours, *window, granularity, settings.price_per_million_input_tokens_usd)
        return JSONResponse({**report, "account": principal.account_name})

    # --- the operator's admin page and the public demo (ccproxy/admin/, ccproxy/demo.py) ---
    admin = AdminApi(settings)
    demo = DemoApi(settings)

    @app.get("/admin", include_in_schema=False)
    async def admin_page() -> Response:
        if not admin.enabled:
            raise unknown_endpoint()
        return asset("admin.html")  # type: ignore[return-value]

    @app.get("/admin/api/summary", include_in_schema=False)
    async def admin_summary(
        request: Request,
        start: str | None = Query(default=None, alias="from"),
        end: str | None = Query(default=None, alias="to"),
        granularity: str = "day",
    ) -> JSONResponse:
        admin.admit(request.headers.get("authorization"), _client(request))
        return _no_store(await admin.summary(_state(request, "store"), start, end, granularity))

    @app.get("/demo", include_in_schema=False)
    async def demo_page() -> Response:
        if not demo.enabled:
            raise unknown_endpoint()
        return asset("demo.html")  # type: ignore[return-value]

    @app.get("/demo/api/samples", include_in_schema=False)
    async def demo_samples() -> JSONResponse:
        if not demo.enabled:
            raise unknown_endpoint()
        return _no_store(samples())

    @app.post("/demo/api/compress", include_in_schema=False)
    async def demo_compress(request: Request) -> JSONResponse:
        demo.admit(_client(request))
        raw = await read_body(request, demo.body_limit)
        return _no_store(await demo.compress(_state(request, "parts"), raw))

    @app.get("/web/{name}", include_in_schema=False)
    async def web_asset(name: str) -> Response:
        found = asset(name)
        if found is None:
            raise unknown_endpoint()
        return found

    # BentoML hands a mounted app only the paths it has routes for; this one claims the rest
    # of /v1: the OpenAI routes ccproxy does not compress are relayed (ccproxy/passthrough.py),
    # anything else gets an OpenAI-shaped 404 instead of plain text.
    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def other_endpoint(request: Request, path: str) -> Response:
        resource = route_of(path)
        if resource is None:
            raise unknown_endpoint()
        principal = await admitted(request)
        if settings.upstream_api_key is not None and resource not in SERVER_KEY_RESOURCES:
            raise refused_with_server_key()
        raw = await read_body(request, settings.max_body_bytes)
        call = RawCall(
            request.method, path, request.scope.get("query_string", b""), raw,
            request.headers.get("content-type"), request.headers.get("accept"),
        )
        request_id = _request_id(request)
        return await relay(_state(request, "parts"), principal, call, request.headers, request_id)

    return app
