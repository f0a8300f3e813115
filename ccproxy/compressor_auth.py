"""The shared secret between the Gateway and the Compressor.

A remote Compressor (CCPROXY_COMPRESSOR_URL) is an HTTP service of its own: without a check,
anyone who reaches it gets free GPU scoring and can flood it. With CCPROXY_COMPRESSOR_TOKEN set,
the Compressor answers only requests that carry the token in ``X-Compressor-Token``; the
Gateway's BentoML client sends it on every call (``authorize_client``). Health checks and
``/metrics`` (which has a token of its own) stay open to the orchestrator.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_HEADER = "x-compressor-token"
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


class CompressorTokenMiddleware:
    """401 in the OpenAI error shape for any request without the right token."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self._expected = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self._expected is None
            or scope["type"] != "http"
            or scope["path"].rstrip("/") in OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(TOKEN_HEADER.encode(), b"")
        if hmac.compare_digest(sent, self._expected):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": {"message": "A valid compressor token is required.", "type": "invalid_request_error",
                       "param": None, "code": "invalid_compressor_token"}}
        ).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def authorize_client(client: Any, token: str | None) -> None:
    """Make a BentoML dependency client (``bentoml.depends(...).to_async``) send the token.

    ``bentoml.depends`` takes no headers. BentoML 1.4's client (an aiohttp session manager,
    ``_bentoml_impl.client.proxy2``) builds each session from its ``default_headers`` dict, the
    same object it keeps, so an entry added there goes with every call of every later session.
    Call this before the first call (``Gateway.__init__``); bentoml is pinned, and
    ``tests/e2e/test_security.py`` checks that the Gateway's calls are accepted.
    """
    headers = getattr(client, "default_headers", None)
    if token and isinstance(headers, dict):  # an in-process dependency (no HTTP) has none
        headers[TOKEN_HEADER] = token
