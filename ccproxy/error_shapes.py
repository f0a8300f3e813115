"""Which API's error shape a path answers in: Anthropic's below /v1/messages, OpenAI's elsewhere.

An Anthropic SDK reads ``{"type": "error", "error": {"type", "message"}}``; an OpenAI SDK reads
``{"error": {"message", "type", "param", "code"}}``. Every error ccproxy itself answers with
(a ProxyError, a 404, the overload 503, an unexpected 500) goes through here.
"""

from __future__ import annotations

from typing import Any

from ccproxy.messages.protocol import anthropic_error_body
from ccproxy.protocol import error_body

ANTHROPIC_PREFIX = "/v1/messages"


def speaks_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def error_payload(
    path: str, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    if speaks_anthropic(path):
        return anthropic_error_body(status, message)
    return error_body(message, type=type, param=param, code=code)
