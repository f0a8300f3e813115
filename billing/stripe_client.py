"""A small synchronous client for the few Stripe endpoints the billing job uses.

httpx rather than the `stripe` package: the job needs a configurable API base (localstripe,
test fakes), its own idempotency keys on every POST, and retries it can see and test. Every
POST carries an Idempotency-Key, so retrying one is safe: Stripe replays the first result.

Retried, with capped exponential backoff (Retry-After honoured): network errors, 409 (a
concurrent request with the same key), 429 and 5xx; Stripe's `Stripe-Should-Retry` header
overrides that list either way. Anything else, and the last failure, raises StripeError.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from billing.job import StripeRequest

# The request shapes in billing/job.py are written against this version; pinning it keeps a
# change of the account's default version from changing them.
STRIPE_API_VERSION = "2025-03-31.basil"
USER_AGENT = "ccproxy-billing/0.1"

log = logging.getLogger("billing.stripe")

_RETRY_STATUSES = frozenset({409, 429})
# A 4xx in this set means Stripe refused the request before creating anything.
_REFUSALS = frozenset({400, 402, 403, 404})


class StripeError(RuntimeError):
    """A Stripe call that failed for good (after any retries). `status` is None when no HTTP
    answer came back (network error, timeout)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        kind = "/".join(x for x in (self.error_type, self.code) if x)
        detail = f" {kind}" if kind else ""
        request = f" (request {self.request_id})" if self.request_id else ""
        return f"Stripe {where}{detail}: {self.args[0]}{request}"

    @property
    def duplicate_meter_event(self) -> bool:
        """Stripe already holds a meter event with this identifier: the usage was delivered."""
        message = str(self.args[0]).lower()
        return self.code == "duplicate_meter_event" or (
            self.status == 400 and "already exists with identifier" in message
        )

    @property
    def refused(self) -> bool:
        """Stripe certainly created nothing: a validation error, not an idempotency clash (a
        key reused with other parameters means an earlier request did get through)."""
        return (
            self.status in _REFUSALS
            and self.error_type != "idempotency_error"
            and not self.duplicate_meter_event
        )

    @property
    def authentication(self) -> bool:
        return self.status == 401


def encode(params: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Stripe's form encoding: nested maps as a[b]=, lists as a[0]=, booleans as true/false."""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if value is None:
            continue
        if isinstance(value, Mapping):
            pairs.extend(encode(value, name))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    pairs.extend(encode(item, f"{name}[{i}]"))
                else:
                    pairs.append((f"{name}[{i}]", _scalar(item)))
        else:
            pairs.append((name, _scalar(value)))
    return pairs


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class StripeClient:
    def __init__(
        self,
        api_key: str,
        api_base: str = "https://api.stripe.com",
        *,
        max_retries: int = 5,
        timeout_s: float = 30.0,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 20.0,
        retry_after_cap_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=api_base.rstrip("/"),
            timeout=timeout_s,
            transport=transport,
            headers={
                "Authorization": f"Bearer {api_key}",
                "Stripe-Version": STRIPE_API_VERSION,
                "User-Agent": USER_AGENT,
            },
        )
        self.max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._retry_after_cap_s = retry_after_cap_s
        self._sleep = sleep

    def __repr__(self) -> str:  # never the key
        return f"StripeClient({self._http.base_url!s})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StripeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls ---------------------------------------------------------------------------------
    def send(self, request: StripeRequest) -> dict[str, Any]:
        if request.method == "POST":
            if not request.idempotency_key:
                raise ValueError("every POST to Stripe needs an idempotency key")
            return self.post(request.path, request.params, request.idempotency_key)
        return self.get(request.path, request.params)

    def post(self, path: str, params: Mapping[str, Any], idempotency_key: str) -> dict[str, Any]:
        return self._call("POST", path, params, {"Idempotency-Key": idempotency_key})

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self._call("GET", path, params or {}, {})

    def _call(
        self, method: str, path: str, params: Mapping[str, Any], headers: dict[str, str]
    ) -> dict[str, Any]:
        pairs = encode(params)
        attempt = 0
        while True:
            try:
                if method == "POST":
                    # Encoded by hand: httpx's `data=` takes a dict, which cannot hold the
                    # repeated and bracketed keys in order.
                    form = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
                    response = self._http.post(path, content=_form(pairs), headers=form)
                else:
                    response = self._http.get(path, params=tuple(pairs), headers=headers)
            except httpx.TransportError as exc:
                error = StripeError(f"{type(exc).__name__}: {exc}")
                retry, delay = True, None
            else:
                if response.status_code < 400:
                    body: dict[str, Any] = response.json()
                    return body
                error = _error(response)
                retry, delay = _retry_decision(response)
            if not retry or attempt >= self.max_retries:
                raise error
            wait = self._delay(attempt, delay)
            attempt += 1
            log.warning(
                "%s %s failed (%s); retry %d of %d in %.1fs",
                method,
                path,
                error,
                attempt,
                self.max_retries,
                wait,
            )
            self._sleep(wait)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self._retry_after_cap_s)
        backoff = min(self._backoff_cap_s, self._backoff_base_s * 2.0**attempt)
        # Jitter spreads retries of parallel jobs; half the delay stays fixed.
        return backoff * (0.5 + random.random() / 2)


def _form(pairs: list[tuple[str, str]]) -> bytes:
    return str(httpx.QueryParams(tuple(pairs))).encode()


def _retry_decision(response: httpx.Response) -> tuple[bool, float | None]:
    should = response.headers.get("Stripe-Should-Retry")
    if should is not None:
        retry = should.strip().lower() == "true"
    else:
        retry = response.status_code in _RETRY_STATUSES or response.status_code >= 500
    return retry, _retry_after(response.headers.get("Retry-After"))


def _retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form: Stripe sends no dates here, and a date would need a clock.
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _error(response: httpx.Response) -> StripeError:
    request_id = response.headers.get("Request-Id")
    try:
        payload = response.json().get("error") or {}
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    message = payload.get("message") or response.reason_phrase or "error"
    return StripeError(
        str(message),
        status=response.status_code,
        error_type=payload.get("type"),
        code=payload.get("code"),
        request_id=request_id,
    )
