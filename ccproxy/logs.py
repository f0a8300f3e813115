"""One JSON line per proxied request on stderr — numbers and ids only, never message text.

The line is built from the usage event, which holds no text by construction, so a prompt
cannot reach the log by accident.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields as dataclass_fields

from ccproxy.usage.events import UsageEvent

access_logger = logging.getLogger("ccproxy.access")


def configure_access_log(level: int = logging.INFO) -> None:
    """Its own handler: BentoML configures only its loggers, and the root's last-resort
    handler would drop INFO lines."""
    if access_logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.addHandler(handler)
    access_logger.setLevel(level)
    access_logger.propagate = False


def access_line(request_id: str, event: UsageEvent) -> str:
    # A shallow copy: `dataclasses.asdict` deep-copies every field, a measurable share of a
    # small request's time in the Gateway (bench/profile_gateway.py).
    fields = {f.name: getattr(event, f.name) for f in dataclass_fields(event)}
    fields["created_at"] = event.created_at.isoformat()
    return json.dumps({"log": "chat_completion", "request_id": request_id, **fields}, ensure_ascii=True)


def log_request(request_id: str, event: UsageEvent) -> None:
    if access_logger.isEnabledFor(logging.INFO):
        access_logger.info(access_line(request_id, event))


def error_line(request_id: str, route: str, status: int, type_: str, code: str | None) -> str:
    """An answer ccproxy gave itself (a refused key, a limit, a malformed body, a failed upstream):
    status, type and code only. The message is left out: some quote a field of the request."""
    return json.dumps(
        {"log": "error", "request_id": request_id, "route": route, "status": status, "type": type_, "code": code},
        ensure_ascii=True,
    )


def log_error(request_id: str, route: str, status: int, type_: str, code: str | None) -> None:
    if access_logger.isEnabledFor(logging.INFO):
        access_logger.info(error_line(request_id, route, status, type_, code))
