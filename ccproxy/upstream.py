"""Talking to the upstream: forward a request, relay its answer (whole or as SSE events).

Two upstreams share one interface: ``HttpUpstream`` (any OpenAI-compatible server over a
pooled httpx client) and ``EmbeddedUpstream`` (the Bento's own llama.cpp service). The app
sees only ``UpstreamReply`` and ``ProxyError``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from ccproxy.auth import KEY_PREFIX
from ccproxy.protocol import ProxyError, dumps_bytes, split_sse, sse_fields
from ccproxy.settings import Settings

# Response headers worth relaying to the caller: rate-limit state and retry hints.
_RELAYED_HEADER_PREFIXES = ("x-ratelimit-", "openai-", "anthropic-ratelimit-")
_RELAYED_HEADERS = {"retry-after", "retry-after-ms"}
# With a server-held key, the upstream's account is the server's: its organization, project
# and rate-limit state (x-ratelimit-*, quotas shared by every caller) are not the caller's to
# see. Only these pass then: the retry hints and the request's own timing.
_SERVER_KEY_RELAYED = {"retry-after", "retry-after-ms", "openai-processing-ms", "openai-version"}
# Relayed bytes must be what the headers say: the upstream's content-encoding is not relayed,
# and a compressed stream would reach the caller undecodable. So ask for none (and decode
# whatever comes anyway, in _sse_events).
_UPSTREAM_DEFAULT_HEADERS = {"accept-encoding": "identity"}
# Caller headers that only make sense together with the caller's own provider key.
_CALLER_ACCOUNT_HEADERS = ("authorization", "openai-organization", "openai-project")
# Caller headers a relayed route needs as they came (the Assistants API wants OpenAI-Beta).
_PASSTHROUGH_CALLER_HEADERS = ("openai-beta", "idempotency-key")
# Anthropic's API version and feature flags: the upstream reads them, ccproxy does not.
_ANTHROPIC_CALLER_HEADERS = ("anthropic-version", "anthropic-beta")


@dataclass
class UpstreamReply:
    status: int
    headers: dict[str, str]
    media_type: str = "application/json"
    body: bytes = b""
    # Set only for a successful streamed answer: whole SSE events, in order.
    events: AsyncIterator[bytes] | None = None


@dataclass(frozen=True)
class RawCall:
    """A request passed through as it came: the route below /v1, its query, its body bytes."""

    method: str
    path: str  # below the upstream's base URL, e.g. "embeddings" or "files/file-abc/content"
    query: bytes
    body: bytes
    content_type: str | None  # the caller's, multipart boundary and all
    accept: str | None


class Upstream(Protocol):
    async def chat_completions(
        self, body: dict[str, Any], caller_headers: Mapping[str, str], stream: bool, size_hint: int = 0
    ) -> UpstreamReply: ...

    async def call(
        self, route: str, body: dict[str, Any], caller_headers: Mapping[str, str], stream: bool, size_hint: int = 0
    ) -> UpstreamReply:
        """POST a JSON body to ``route`` below the base URL (``responses``, ``messages``, …)."""
        ...

    async def models(self, caller_headers: Mapping[str, str]) -> UpstreamReply: ...

    async def passthrough(self, call: RawCall, caller_headers: Mapping[str, str]) -> UpstreamReply: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


def relayed_headers(headers: Mapping[str, str], server_holds_key: bool = False) -> dict[str, str]:
    """The upstream's response headers the caller gets: rate-limit state and retry hints of
    its own provider account, or only the retry hints when the server's key was used."""
    if server_holds_key:
        kept = {name.lower(): value for name, value in headers.items() if name.lower() in _SERVER_KEY_RELAYED}
    else:
        kept = {
            name.lower(): value
            for name, value in headers.items()
            if name.lower() in _RELAYED_HEADERS or name.lower().startswith(_RELAYED_HEADER_PREFIXES)
        }
    if "x-request-id" in headers:
        kept["x-upstream-request-id"] = headers["x-request-id"]
    return kept


def upstream_request_headers(
    caller_headers: Mapping[str, str], server_api_key: str | None
) -> dict[str, str]:
    """Credentials for the upstream: the server's key if it holds one, else the caller's."""
    if server_api_key is not None:
        return {"authorization": f"Bearer {server_api_key}"}
    lowered = {name.lower(): value for name, value in caller_headers.items()}
    forwarded = {name: lowered[name] for name in _CALLER_ACCOUNT_HEADERS if name in lowered}
    # A ccproxy key sent as the Bearer token is ours: it must never reach a third party.
    if forwarded.get("authorization", "").partition(" ")[2].strip().startswith(KEY_PREFIX):
        del forwarded["authorization"]
    if not all(value.isascii() for value in forwarded.values()):
        # httpx cannot send them (a 500 before); the value is not quoted back.
        raise ProxyError(400, "Request headers must be ASCII.", code="invalid_header")
    return forwarded


def anthropic_request_headers(caller_headers: Mapping[str, str], server_api_key: str | None) -> dict[str, str]:
    """Anthropic's credentials: the server's key as x-api-key, else the caller's own provider
    key, which it sends as its Bearer token (its x-api-key is its ccproxy key); and the
    caller's anthropic-version and anthropic-beta as they came."""
    lowered = {name.lower(): value for name, value in caller_headers.items()}
    forwarded = {name: lowered[name] for name in _ANTHROPIC_CALLER_HEADERS if name in lowered}
    if server_api_key is not None:
        forwarded["x-api-key"] = server_api_key
    else:
        scheme, _, token = lowered.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token and not token.startswith(KEY_PREFIX):
            forwarded["x-api-key"] = token
    if not all(value.isascii() for value in forwarded.values()):
        raise ProxyError(400, "Request headers must be ASCII.", code="invalid_header")
    return forwarded


def transport_error(exc: httpx.HTTPError) -> ProxyError:
    if isinstance(exc, httpx.TimeoutException):
        return ProxyError(
            504, "The upstream did not answer in time.", type="upstream_error", code="upstream_timeout"
        )
    if isinstance(exc, httpx.ConnectError):
        return ProxyError(
            502, "Could not connect to the upstream.", type="upstream_error", code="upstream_unreachable"
        )
    return ProxyError(
        502,
        f"The connection to the upstream failed ({type(exc).__name__}).",
        type="upstream_error",
        code="upstream_connection_error",
    )


# Errors raised while the connection is being opened: not one byte of the request has left,
# so sending it again cannot make the upstream run (or bill) it twice. Anything later — a
# read timeout, a reset — may come after the upstream started, and is never retried.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
_REDACTED = b"[redacted]"


def _is_stale_connection(exc: httpx.RemoteProtocolError) -> bool:
    return "without sending a response" in str(exc)


def connect_retry_delay(attempt: int) -> float:
    """Seconds before retry ``attempt`` (0-based): long enough for a restarting upstream or a
    load balancer to move on, short enough to stay well inside a caller's patience."""
    return min(0.1 * 2**attempt, 1.0)


def redact(data: bytes, secret: str | None) -> bytes:
    """``data`` without ``secret``: an upstream that echoes the credentials it got (some do, in
    their 401 bodies) must not hand the server's key to the caller."""
    if not secret:
        return data
    return data.replace(secret.encode(), _REDACTED)


class HttpUpstream:
    """An upstream over HTTP. ``anthropic``: the Messages API's credentials (x-api-key) and
    headers; else OpenAI's (a Bearer token)."""

    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None, *, anthropic: bool = False
    ) -> None:
        base_url = settings.anthropic_upstream_url if anthropic else settings.upstream_url
        api_key = settings.anthropic_upstream_api_key if anthropic else settings.upstream_api_key
        assert base_url is not None
        self._api_key = api_key.get_secret_value() if api_key else None
        self._anthropic = anthropic
        self._connect_retries = settings.upstream_connect_retries
        self._client = httpx.AsyncClient(
            base_url=base_url + "/",
            timeout=httpx.Timeout(
                settings.upstream_read_timeout_s, connect=settings.upstream_connect_timeout_s
            ),
            limits=httpx.Limits(
                max_connections=settings.upstream_max_connections,
                max_keepalive_connections=settings.upstream_max_connections,
                keepalive_expiry=settings.upstream_keepalive_s,
            ),
            transport=transport,  # tests inject httpx.MockTransport; None is the real network
            headers=_UPSTREAM_DEFAULT_HEADERS,
        )

    async def _send(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        stale_retried = False
        while True:
            try:
                return await self._client.send(request, stream=True)
            except _NOT_SENT as exc:
                if attempt >= self._connect_retries:
                    raise transport_error(exc) from exc
                await asyncio.sleep(connect_retry_delay(attempt))
                attempt += 1
            except httpx.RemoteProtocolError as exc:
                # A pooled connection the upstream had already closed: llama.cpp's llama-server
                # drops every connection after a streamed answer although it announced
                # keep-alive, and the next request on it meets a closed socket before any byte
                # of an answer. Sent once more, on a fresh connection; any other protocol error,
                # and a second one, is the caller's 502.
                if stale_retried or not _is_stale_connection(exc):
                    raise transport_error(exc) from exc
                stale_retried = True
            except httpx.HTTPError as exc:
                raise transport_error(exc) from exc

    def _relayed(self, headers: Mapping[str, str]) -> dict[str, str]:
        kept = relayed_headers(headers, server_holds_key=self._api_key is not None)
        if self._api_key is None:
            return kept
        return {name: value.replace(self._api_key, _REDACTED.decode()) for name, value in kept.items()}

    async def _whole(self, response: httpx.Response) -> UpstreamReply:
        try:
            body = await response.aread()
        except httpx.HTTPError as exc:
            failure = transport_error(exc)
            failure.upstream_accepted = response.status_code < 400  # broke mid-answer: billed
            raise failure from exc
        finally:
            await response.aclose()
        if response.status_code >= 400:
            body = redact(body, self._api_key)
        return UpstreamReply(
            status=response.status_code,
            headers=self._relayed(response.headers),
            media_type=response.headers.get("content-type", "application/json"),
            body=body,
        )

    async def chat_completions(
        self, body: dict[str, Any], caller_headers: Mapping[str, str], stream: bool, size_hint: int = 0
    ) -> UpstreamReply:
        return await self.call("chat/completions", body, caller_headers, stream, size_hint)

    async def call(
        self, route: str, body: dict[str, Any], caller_headers: Mapping[str, str], stream: bool, size_hint: int = 0
    ) -> UpstreamReply:
        credentials = (
            anthropic_request_headers(caller_headers, self._api_key)
            if self._anthropic
            else upstream_request_headers(caller_headers, self._api_key)
        )
        request = self._client.build_request(
            "POST",
            route,
            content=await _encoded(body, size_hint),
            headers={"content-type": "application/json", **credentials},
        )
        response = await self._send(request)
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
        if not (stream and response.status_code == 200 and is_sse):
            return await self._whole(response)
        return UpstreamReply(
            status=200,
            headers=self._relayed(response.headers),
            media_type="text/event-stream",
            events=_sse_events(response),
        )

    async def models(self, caller_headers: Mapping[str, str]) -> UpstreamReply:
        request = self._client.build_request(
            "GET", "models", headers=upstream_request_headers(caller_headers, self._api_key)
        )
        return await self._whole(await self._send(request))

    async def passthrough(self, call: RawCall, caller_headers: Mapping[str, str]) -> UpstreamReply:
        """Any other route, bytes in and bytes out. A JSON answer is read whole (it may report
        usage); anything else (SSE, file contents, audio) is relayed as it arrives, so a large
        download never sits in the worker's memory."""
        headers = upstream_request_headers(caller_headers, self._api_key)
        lowered = {name.lower(): value for name, value in caller_headers.items()}
        headers.update({name: lowered[name] for name in _PASSTHROUGH_CALLER_HEADERS if name in lowered})
        for name, value in (("content-type", call.content_type), ("accept", call.accept)):
            if value is not None:
                headers[name] = value
        if not all(value.isascii() for value in headers.values()):
            raise ProxyError(400, "Request headers must be ASCII.", code="invalid_header")
        url = httpx.URL(call.path, query=call.query)  # the query as sent, byte for byte
        request = self._client.build_request(call.method, url, content=call.body or None, headers=headers)
        response = await self._send(request)
        content_type = response.headers.get("content-type", "")
        disposition = response.headers.get("content-disposition")  # a file's name, on file contents
        if response.status_code >= 400 or content_type.startswith("application/json"):
            reply = await self._whole(response)
            if disposition is not None:
                reply.headers["content-disposition"] = disposition
            return reply
        relayed = self._relayed(response.headers)
        if disposition is not None:
            relayed["content-disposition"] = disposition
        is_sse = content_type.startswith("text/event-stream")
        return UpstreamReply(
            status=response.status_code, headers=relayed, media_type=content_type or "application/octet-stream",
            events=_sse_events(response) if is_sse else _chunks(response),
        )

    async def ready(self) -> bool:
        try:
            reply = await self.models({})
        except ProxyError:
            return False
        rejected_our_key = self._api_key is not None and reply.status in (401, 403)
        return reply.status < 500 and not rejected_our_key

    async def aclose(self) -> None:
        await self._client.aclose()


# Encoding a body this large takes milliseconds: it leaves the event loop for a thread.
_ENCODE_IN_THREAD_BYTES = 1 << 16


async def _encoded(body: dict[str, Any], size_hint: int) -> bytes:
    """The JSON bytes of ``body``; ``size_hint`` (the caller's body size) picks the thread."""
    if size_hint < _ENCODE_IN_THREAD_BYTES:
        return dumps_bytes(body)
    return await asyncio.to_thread(dumps_bytes, body)


async def _chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.HTTPError as exc:
        raise transport_error(exc) from exc
    finally:
        await response.aclose()


async def _sse_events(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        # aiter_bytes, not aiter_raw: an upstream that compresses despite "identity" is decoded
        # here, since no content-encoding header goes to the caller.
        async for event in split_sse(response.aiter_bytes()):
            yield event
    except httpx.HTTPError as exc:
        raise transport_error(exc) from exc
    finally:
        await response.aclose()


class EmbeddedLLMHandle(Protocol):
    """What the Gateway needs from the embedded llama.cpp service (a BentoML dependency)."""

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[str]: ...

    async def models(self) -> dict[str, Any]: ...


class EmbeddedUpstream:
    """The embedded model as an upstream. Its answers already use the OpenAI shapes.

    A streamed answer starts with one ``ccproxy-status`` event carrying the status (and the
    error body when the request was refused), so a refusal becomes a real HTTP status here.
    """

    def __init__(self, llm: EmbeddedLLMHandle) -> None:
        self._llm = llm

    async def call(
        self, route: str, body: dict[str, Any], caller_headers: Mapping[str, str], stream: bool, size_hint: int = 0
    ) -> UpstreamReply:
        if route == "chat/completions":
            return await self.chat_completions(body, caller_headers, stream, size_hint)
        if route == "responses":
            from ccproxy.responses.bridge import bridged

            async def chat(chat_body: dict[str, Any], chat_stream: bool) -> UpstreamReply:
                return await self.chat_completions(chat_body, caller_headers, chat_stream, size_hint)

            return await bridged(chat, body, stream)
        raise ProxyError(404, "The embedded model does not serve this route.", code="not_found")

    async def chat_completions(
        self, body: dict[str, Any], caller_headers: Mapping[str, str], stream: bool, size_hint: int = 0
    ) -> UpstreamReply:
        if not stream:
            envelope = await self._llm.chat(body=body)
            return UpstreamReply(
                status=envelope["status"], headers={}, body=json.dumps(envelope["body"]).encode()
            )
        events = split_sse(chunk.encode() async for chunk in self._llm.chat_stream(body=body))
        first = await anext(events)
        status = json.loads(sse_fields(first)["data"])
        if status["status"] != 200:
            await events.aclose()
            return UpstreamReply(
                status=status["status"], headers={}, body=json.dumps(status["body"]).encode()
            )
        return UpstreamReply(
            status=200, headers={}, media_type="text/event-stream", events=events
        )

    async def models(self, caller_headers: Mapping[str, str]) -> UpstreamReply:
        return UpstreamReply(status=200, headers={}, body=json.dumps(await self._llm.models()).encode())

    async def passthrough(self, call: RawCall, caller_headers: Mapping[str, str]) -> UpstreamReply:
        raise ProxyError(
            404,
            "The embedded model serves chat completions and models only; set CCPROXY_UPSTREAM_URL "
            "to an OpenAI-compatible upstream for this route.",
            code="not_found",
        )

    async def ready(self) -> bool:
        try:
            await self._llm.models()
        except Exception:
            return False
        return True

    async def aclose(self) -> None:
        return None
