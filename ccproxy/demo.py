"""POST /demo/api/compress: the public demo page's one call (CCPROXY_DEMO_ENABLED).

A visitor's chat is compressed exactly as a proxied request would be (the Gateway's
ContextCompressor, the same scorer and settings), and the answer lists every unit with its
text and whether it was kept, so the page can show what was dropped. Nothing is stored: no
usage event, no log of the text, no retrieval copy; the text goes back only to the visitor who
sent it. The demo is open to anyone, so each client address and all visitors together get a
few runs a minute, and the chat is capped in messages and characters before anything is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ccproxy.compression.pipeline import Compression, UnitReport
from ccproxy.limits import RateLimiter
from ccproxy.protocol import ProxyError, invalid_field, parse_json_object, unknown_endpoint
from ccproxy.serving import ChatParts
from ccproxy.settings import Settings

logger = logging.getLogger("ccproxy")

MAX_MESSAGES = 100
# Room for JSON escapes and the other fields around the capped message text.
BODY_OVERHEAD_BYTES = 64 * 1024


class DemoMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class DemoCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[DemoMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    ratio: float = Field(default=0.5, ge=0.05, le=0.95)


def parse_demo_call(raw: bytes, max_chars: int) -> DemoCall:
    try:
        call = DemoCall.model_validate(parse_json_object(raw))
    except ValidationError as exc:
        raise invalid_field(exc) from None
    chars = sum(len(m.content) for m in call.messages)
    if chars > max_chars:
        raise ProxyError(
            413, f"The demo takes chats of up to {max_chars:,} characters; this one has {chars:,}.",
            code="request_too_large",
        )
    return call


def _unit(report: UnitReport) -> dict[str, Any]:
    return {
        "text": report.text,
        "kind": report.kind,
        "tokens": report.tokens,
        "kept_tokens": report.kept_tokens,
        "kept": report.kept,
        "partly": report.partly,
        "protected": report.protected,
    }


def demo_answer(call: DemoCall, compression: Compression[Any]) -> dict[str, Any]:
    """Each message with its units in order, and the figures. A chat that was not compressed
    (under the threshold, nothing droppable) comes back whole, each message one kept unit."""
    by_turn: dict[int, list[dict[str, Any]]] = {}
    for report in compression.units:
        by_turn.setdefault(report.turn, []).append(_unit(report))
    messages = []
    for i, message in enumerate(call.messages):
        units = by_turn.get(i)
        if units is None:  # a message that was not segmented is forwarded whole
            units = [{"text": message.content, "kind": "whole", "tokens": None, "kept_tokens": None,
                      "kept": True, "partly": False, "protected": True}]
        messages.append({"role": message.role, "units": units})
    before, after = compression.tokens_before, compression.tokens_after
    return {
        "object": "ccproxy.demo",
        "outcome": compression.outcome,
        "ratio": call.ratio,
        "tokens_before": before,
        "tokens_after": after,
        "tokens_saved": before - after,
        "savings_percent": round(100.0 * (before - after) / before, 1) if before else 0.0,
        "messages": messages,
    }


class DemoApi:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.demo_enabled
        self.max_chars = settings.demo_max_chars
        self.body_limit = settings.demo_max_chars * 4 + BODY_OVERHEAD_BYTES  # UTF-8 up to 4 bytes a char
        self._per_address = RateLimiter(settings.demo_requests_per_minute, 0)
        self._everyone = RateLimiter(settings.demo_total_requests_per_minute, 0)

    def admit(self, client: str | None) -> None:
        if not self.enabled:
            raise unknown_endpoint()
        self._per_address.admit_request(f"demo:{client or '?'}")
        self._everyone.admit_request("demo")

    async def compress(self, parts: ChatParts, raw: bytes) -> dict[str, Any]:
        call = await asyncio.to_thread(parse_demo_call, raw, self.max_chars)
        messages = [m.model_dump() for m in call.messages]
        counter = await parts.counter(None)
        try:
            compression = await parts.compressor.compress_as_asked(
                messages, counter, ratio=call.ratio, budget_tokens=None, scope="demo"
            )
        except Exception as exc:
            logger.warning("demo compression failed: %s", type(exc).__name__)
            raise ProxyError(
                503, "The compressor could not score this chat; try again later.", type="server_error",
                code="compressor_unavailable",
            ) from None
        return demo_answer(call, compression)


@lru_cache(maxsize=1)
def samples() -> dict[str, Any]:
    """The sample chats the page offers and where they come from (ccproxy/web/demo_samples.json,
    made by tools/demo_samples.py from the NQ evaluation data)."""
    text = resources.files("ccproxy.web").joinpath("demo_samples.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded

