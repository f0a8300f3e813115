"""The billing job's Stripe client: the official SDK (stripe-python) with our retry policy.

stripe-python encodes the parameters, sends the key, the pinned API version and each POST's
Idempotency-Key, parses the answer and raises typed errors; `api_base` points it at localstripe
or a test fake. The retries stay ours because the SDK's (16.x, `HTTPClient._should_retry`) do not
cover what a nightly job meets: it never retries a 429 and never reads Retry-After, and it sleeps
with `time.sleep` where tests need to see the delays. So the SDK runs with
`max_network_retries=0` and this loop retries, with capped, jittered exponential backoff
(Retry-After honoured, capped): network errors the SDK marks retryable, 409 (a concurrent request
with the same key), 429 and 5xx; Stripe's `Stripe-Should-Retry` header overrides that list
either way. Every POST carries our Idempotency-Key, so a retry is safe: Stripe replays the first
result. Anything else, and the last failure, raises StripeError.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import stripe

from billing.job import StripeRequest

# The request shapes in billing/job.py are written against this version; pinning it keeps a
# change of the account's default version from changing them.
STRIPE_API_VERSION = "2025-03-31.basil"

log = logging.getLogger("billing.stripe")
# The SDK logs every request and response at INFO; the job's own report says what it sent, and
# its retries are logged here.
logging.getLogger("stripe").setLevel(logging.WARNING)

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
    ) -> None:
        self._api_base = api_base.rstrip("/")
        self._http = stripe.RequestsClient(timeout=timeout_s)
        self._sdk = stripe.StripeClient(
            api_key,
            stripe_version=STRIPE_API_VERSION,
            base_addresses={"api": self._api_base},
            max_network_retries=0,  # the loop below retries (see the module docstring)
            http_client=self._http,
        )
        self.max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._retry_after_cap_s = retry_after_cap_s
        self._sleep = sleep

    def __repr__(self) -> str:  # never the key
        return f"StripeClient({self._api_base})"

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
        return self._call("post", path, {**params, "idempotency_key": idempotency_key})

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self._call("get", path, dict(params or {}))

    def _call(self, method: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                data: dict[str, Any] = self._sdk.raw_request(method, path, **params).data
                return data
            except stripe.StripeError as exc:
                error = _error(exc)
                retry, delay = _retry_decision(exc)
            if not retry or attempt >= self.max_retries:
                raise error
            wait = self._delay(attempt, delay)
            attempt += 1
            log.warning(
                "%s %s failed (%s); retry %d of %d in %.1fs",
                method.upper(),
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


def _retry_decision(exc: stripe.StripeError) -> tuple[bool, float | None]:
    if exc.http_status is None:  # no answer: the SDK knows which network errors are transient
        return bool(getattr(exc, "should_retry", False)), None
    headers = exc.headers or {}
    should = headers.get("Stripe-Should-Retry")
    if should is not None:
        retry = should.strip().lower() == "true"
    else:
        retry = exc.http_status in _RETRY_STATUSES or exc.http_status >= 500
    return retry, _retry_after(headers.get("Retry-After"))


def _retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form: Stripe sends no dates here, and a date would need a clock.
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _error(exc: stripe.StripeError) -> StripeError:
    if exc.http_status is None:
        return StripeError(f"{type(exc).__name__}: {exc.user_message or exc}")
    body = exc.json_body if isinstance(exc.json_body, dict) else {}
    payload = body.get("error")
    payload = payload if isinstance(payload, dict) else {}
    return StripeError(
        str(payload.get("message") or exc.user_message or "error"),
        status=exc.http_status,
        error_type=payload.get("type"),
        code=payload.get("code") or exc.code,
        request_id=exc.request_id,
    )
