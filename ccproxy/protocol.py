"""The OpenAI wire protocol as ccproxy sees it: request validation, error bodies, SSE framing.

Validation is lenient on purpose: ccproxy checks only what it must understand (``model``,
``messages``, ``stream``) and forwards every other field untouched, so new OpenAI features
(tools, response_format, audio, …) pass through without a release of ccproxy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Literal, TypeVar

import orjson

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from ccproxy.identifiers import EndUserId, ModelName


class ProxyError(Exception):
    """An error that ccproxy itself answers with, in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        # Set when the upstream had accepted the request (its answer had started) before this
        # failure: the provider bills such a request, so its usage event carries the prompt.
        self.upstream_accepted = False

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def invalid_field(exc: ValidationError) -> ProxyError:
    """A 400 naming the first field pydantic refused."""
    first = exc.errors(include_url=False)[0]
    param = param_path(tuple(first["loc"]))
    return ProxyError(400, f"Invalid value for '{param}': {first['msg']}.", param=param)


def unknown_endpoint() -> ProxyError:
    # The path is not quoted back: error bodies never repeat request content.
    return ProxyError(404, "Unknown endpoint: see /v1/openapi.json for the routes.", code="not_found")


def usage_unavailable() -> ProxyError:
    return ProxyError(
        503, "Usage cannot be read right now; try again shortly.", type="server_error", code="usage_store_unavailable"
    )


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr = Field(min_length=1)
    content: Any = Field(
        default=None,
        json_schema_extra={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object"}},
                {"type": "null"},
            ]
        },
    )

    @field_validator("content")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        # A string, content parts (text, image_url, input_audio, …), or null beside tool calls.
        parts_ok = isinstance(value, list) and all(isinstance(part, dict) for part in value)
        if value is None or isinstance(value, str) or parts_ok:
            return value
        raise ValueError("must be a string, an array of content parts, or null")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: ModelName = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    user: EndUserId | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None


def param_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


# Deeper than any real request (tool schemas nest a dozen levels), and far enough below
# Python's recursion limit that re-encoding, validation and templating never hit it.
MAX_JSON_DEPTH = 64
# A \uD800-\uDFFF escape: json.loads turns a lone one into a str that cannot be encoded again.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


_STRUCTURE_ONLY = bytes(b for b in range(256) if b not in b'"[]{}')  # what translate deletes
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
# Bytes handled per call: each call holds the GIL, and this many take a few milliseconds.
_BYTES_AT_ONCE = 1 << 16


def _outside_strings(structure: bytes) -> bytes:
    """Of ``"``, brackets and nothing else (no escapes left), the brackets outside strings."""
    kept: list[bytes] = []
    in_string = False
    for start in range(0, len(structure), _BYTES_AT_ONCE):
        pieces = structure[start : start + _BYTES_AT_ONCE].split(b'"')
        kept.append(b"".join(pieces[1::2] if in_string else pieces[::2]))
        in_string ^= (len(pieces) - 1) % 2 == 1
    return b"".join(kept)


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in ``raw``, a valid JSON text, read off the bytes in
    steps of a few milliseconds each. Walking the parsed objects in Python took 0.9 s for 400 k
    content parts, and even in a thread that held up every other request on the worker (each
    of their socket calls waits for the GIL). In valid JSON a backslash only starts an escape,
    so removing ``\\\\`` pairs and then ``\\"`` leaves every remaining ``"`` a string's edge."""
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _outside_strings(unescaped.translate(None, _STRUCTURE_ONLY))
    level = peak = 0
    for start in range(0, len(brackets), _BYTES_AT_ONCE):
        chunk = brackets[start : start + _BYTES_AT_ONCE]
        levels = list(accumulate(map(_BRACKET_STEP.__getitem__, chunk), initial=level))
        peak = max(peak, max(levels))
        level = levels[-1]
    return peak


# Text searched per call: each regex call holds the GIL for its whole scan (~1 ms a MiB).
_SCAN_SLICE = 1 << 20


def _found(pattern: re.Pattern[Any], data: Any, longest_match: int) -> bool:
    """``pattern.search`` over ``data`` slice by slice; slices overlap by ``longest_match`` - 1
    so a match across a seam is found."""
    for start in range(0, len(data), _SCAN_SLICE):
        if pattern.search(data, start, min(len(data), start + _SCAN_SLICE + longest_match - 1)):
            return True
    return False


def _has_lone_surrogate(raw: bytes, value: Any) -> bool:
    if not _found(_SURROGATE_ESCAPE, raw, 4):
        return False  # the common case: no escape at all, no second pass
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# 19 digits or more may not fit 64 bits, and orjson reads such an integer as a float (it would
# be forwarded changed): those bodies are read by json, which keeps every digit.
_LONG_INTEGER = re.compile(r"\d{19,}")


def _not_a_number(literal: str) -> Any:
    raise ValueError(f"{literal} is not a JSON number")


def _finite(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise ValueError("a number too large for a double")
    return value


def _loads(text: str) -> tuple[Any, bool]:
    """(the value; whether json, not orjson, read it). orjson where it can: parsing holds the
    GIL for the whole call, and orjson holds it for about half as long as json (a 6 MB body of
    400 k objects: 76 ms against 123 ms), which is what other requests on the worker wait. json
    for long integers (above), for what orjson refuses (a lone surrogate among them), and to say
    where the syntax broke. NaN, Infinity and numbers beyond a double are not JSON numbers:
    ValueError."""
    if not _found(_LONG_INTEGER, text, 19):  # 19 digits found even across a seam
        try:
            return orjson.loads(text), False
        except orjson.JSONDecodeError:
            pass
    return json.loads(text, parse_constant=_not_a_number, parse_float=_finite), True


def dumps_bytes(value: Any) -> bytes:
    """Compact JSON bytes, UTF-8 as it is (``ensure_ascii=False``); orjson first, as ``_loads``."""
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):  # e.g. an integer json read beyond 64 bits
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be one JSON object of bounded depth and valid Unicode."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProxyError(400, f"Request body is not valid UTF-8 (byte {exc.start}).") from None
    too_deep = ProxyError(400, f"Request body is nested too deeply (more than {MAX_JSON_DEPTH} levels).")
    try:
        value, read_by_json = _loads(text)
    except RecursionError:
        raise too_deep from None
    except json.JSONDecodeError as exc:
        raise ProxyError(
            400,
            "We could not parse the JSON body of your request: "
            f"{exc.msg} at line {exc.lineno} column {exc.colno}.",
        ) from None
    except ValueError:  # NaN/Infinity, a number beyond a double, an integer of > 4,300 digits
        raise ProxyError(
            400, "Request body holds a number that is not a finite JSON number (NaN, Infinity, "
            "too large, or too many digits).",
        ) from None
    if not isinstance(value, dict):
        raise ProxyError(400, "Request body must be a JSON object.")
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise too_deep
    # orjson refuses lone surrogates itself; only what json read needs the (re-encoding) check.
    if read_by_json and _has_lone_surrogate(raw, value):
        raise ProxyError(400, "Request body contains a lone UTF-16 surrogate escape (invalid Unicode).")
    return value


class CompressRequest(BaseModel):
    """Body of ``POST /v1/compress``."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    ratio: float | None = Field(default=None, gt=0, le=1)
    budget: int | None = Field(default=None, ge=1)
    model: ModelName | None = None  # picks the tokenizer; recorded with the compress usage event


_Request = TypeVar("_Request", bound=BaseModel)


# Messages validated per call: pydantic holds the GIL for a whole call (100 k messages: 270 ms
# in one piece, which every other request on the worker waited); a slice of this many is ~3 ms.
MESSAGES_AT_ONCE = 1000
_MESSAGE_LIST: TypeAdapter[list[ChatMessage]] = TypeAdapter(list[ChatMessage])


def _validated(raw: bytes, schema: type[_Request]) -> tuple[dict[str, Any], _Request]:
    """The body as sent and its checked view.

    The dict, not the model, is what gets forwarded, so fields ccproxy does not know keep
    their exact values. Of a long ``messages`` list, the view holds the first
    MESSAGES_AT_ONCE; the rest are checked slice by slice and read from the dict.
    """
    body = parse_json_object(raw)
    messages = body.get("messages")
    head = body
    if isinstance(messages, list) and len(messages) > MESSAGES_AT_ONCE:
        head = {**body, "messages": messages[:MESSAGES_AT_ONCE]}
    try:
        request = schema.model_validate(head)
        if head is not body:
            for start in range(MESSAGES_AT_ONCE, len(messages), MESSAGES_AT_ONCE):
                _check_messages(messages, start)
    except ValidationError as exc:
        raise invalid_field(exc) from None
    return body, request


def validated_fields(schema: type[_Request], body: dict[str, Any], apart: str) -> _Request:
    """The body's fields but ``apart`` (a long list the caller checks on its own, in linear
    time) validated against ``schema``; a 400 naming the first bad field."""
    try:
        return schema.model_validate({key: value for key, value in body.items() if key != apart})
    except ValidationError as exc:
        raise invalid_field(exc) from None


def _check_messages(messages: list[Any], start: int) -> None:
    try:
        _MESSAGE_LIST.validate_python(messages[start : start + MESSAGES_AT_ONCE])
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = first["loc"]
        param = param_path(("messages", start + int(loc[0]), *loc[1:]))
        raise ProxyError(400, f"Invalid value for '{param}': {first['msg']}.", param=param) from None


def parse_chat_request(raw: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    return _validated(raw, ChatCompletionRequest)


def parse_compress_request(raw: bytes) -> tuple[dict[str, Any], CompressRequest]:
    return _validated(raw, CompressRequest)


@dataclass(frozen=True)
class CompressionControl:
    """What the caller asked of the compressor for one request (None: server default)."""

    enabled: bool | None = None
    ratio: float | None = None
    budget_tokens: int | None = None
    mode: Literal["lossy", "lossless", "citation"] | None = None


_CONTROL_FIELD = "ccproxy"


_EXPECTED = {
    "compression": "'on' or 'off'",
    "ratio": "a number in (0, 1]",
    "budget": "a whole number >= 1",
    "mode": "'lossy', 'lossless' or 'citation'",
}


def _control_value(option: str, name: str, raw: Any, parse: Callable[[Any], Any]) -> Any:
    try:
        return parse(raw)
    except (TypeError, ValueError, OverflowError):
        # The value is not quoted back: errors must never carry request content.
        raise ProxyError(400, f"Invalid value for '{name}': expected {_EXPECTED[option]}.", param=name) from None


def _switch(raw: Any) -> bool:
    value = str(raw).strip().lower()
    if value not in ("on", "off"):
        raise ValueError(value)
    return value == "on"


def _ratio(raw: Any) -> float:
    value = float(raw)
    if not 0.0 < value <= 1.0:
        raise ValueError(value)
    return value


def _mode(raw: Any) -> str:
    if not isinstance(raw, str) or raw.strip().lower() not in ("lossy", "lossless", "citation"):
        raise ValueError("mode")
    return raw.strip().lower()


def _budget(raw: Any) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError(raw)
    value = int(raw)
    if value < 1:
        raise ValueError(value)
    return value


def compression_control(
    headers: Mapping[str, str], body: dict[str, Any]
) -> tuple[CompressionControl, dict[str, Any]]:
    """Per-request compression settings, and the body without ccproxy's own field.

    Sources: the optional body field ``"ccproxy": {"compression", "ratio", "budget", "mode"}`` and
    the headers ``X-Compression``, ``X-Compression-Ratio``, ``X-Compression-Budget``,
    ``X-Compression-Mode``; a header wins over the body field. The field never reaches the upstream.
    """
    field = body.get(_CONTROL_FIELD, {})
    if not isinstance(field, dict):
        raise ProxyError(400, "'ccproxy' must be an object.", param=_CONTROL_FIELD)
    if set(field) - set(_EXPECTED):
        raise ProxyError(
            400, "Unknown 'ccproxy' option; the options are compression, ratio, budget and mode.", param=_CONTROL_FIELD
        )
    lowered = {name.lower(): value for name, value in headers.items()}
    sources = {
        "compression": ("x-compression", _switch),
        "ratio": ("x-compression-ratio", _ratio),
        "budget": ("x-compression-budget", _budget),
        "mode": ("x-compression-mode", _mode),
    }
    values: dict[str, Any] = {}
    for option, (header, parse) in sources.items():
        if header in lowered:
            values[option] = _control_value(option, header, lowered[header], parse)
        elif field.get(option) is not None:
            values[option] = _control_value(option, f"{_CONTROL_FIELD}.{option}", field[option], parse)
    control = CompressionControl(
        enabled=values.get("compression"), ratio=values.get("ratio"), budget_tokens=values.get("budget"),
        mode=values.get("mode"),
    )
    forwarded = {key: value for key, value in body.items() if key != _CONTROL_FIELD}
    return control, forwarded


class SSEDecoder:
    """Splits a byte stream into whole server-sent events (each ending in a blank line).

    Relaying whole events, never half of one, lets later stages read or drop single events
    and keeps a client's parser from ever seeing a torn line.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        events: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return events
            events.append(self._buffer[: end + 2])
            self._buffer = self._buffer[end + 2 :]

    def flush(self) -> list[bytes]:
        """What is left when the stream ends: a last event without its blank line."""
        rest, self._buffer = self._buffer, b""
        return [rest + b"\n\n"] if rest.strip() else []


async def split_sse(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.flush():
        yield event


def sse_event(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def sse_fields(event: bytes) -> dict[str, str]:
    """The fields of one event; multi-line ``data`` joined with newlines, per the SSE spec."""
    fields: dict[str, str] = {}
    for line in event.decode("utf-8", errors="replace").split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value
    return fields
