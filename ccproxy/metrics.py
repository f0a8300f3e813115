"""Prometheus metrics of the Gateway and the Compressor, served on BentoML's ``/metrics``.

prometheus_client is imported only when the metrics are created, inside a worker: BentoML sets
PROMETHEUS_MULTIPROC_DIR when a worker starts, and a prometheus_client imported earlier would
stay in single-process mode, invisible on ``/metrics``. Labels have bounded values only: the
tokenizer family (from settings, not from callers), status classes, outcomes — never keys,
accounts, model names as sent, or text.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class ChatObserver(Protocol):
    """What one chat completion reports as it goes."""

    def compressed(self, outcome: str, seconds: float) -> None: ...

    def refused(self, reason: str) -> None: ...

    def upstream_answered(self, seconds: float, status: int | None) -> None: ...

    def finished(
        self, family: str, status: int, stream: bool, seconds: float, tokens_in: int, tokens_saved: int, tokens_forwarded: int
    ) -> None: ...

    def retrieved(self, rounds: int, found: int, missing: int) -> None:
        """Lossless mode: extra upstream rounds one request took, ccproxy_retrieve calls answered."""
        ...


class NoMetrics:
    def compressed(self, outcome: str, seconds: float) -> None:
        return None

    def refused(self, reason: str) -> None:
        return None

    def upstream_answered(self, seconds: float, status: int | None) -> None:
        return None

    def finished(
        self, family: str, status: int, stream: bool, seconds: float, tokens_in: int, tokens_saved: int, tokens_forwarded: int
    ) -> None:
        return None

    def retrieved(self, rounds: int, found: int, missing: int) -> None:
        return None


@dataclass(frozen=True)
class GatewayMetrics:
    tokens_in: Any
    tokens_saved: Any
    tokens_forwarded: Any
    requests: Any
    latency: Any
    compression_latency: Any
    fail_open: Any
    upstream_latency: Any
    upstream_errors: Any
    refused_requests: Any
    retrieve_rounds: Any
    retrieve_calls: Any

    def compressed(self, outcome: str, seconds: float) -> None:
        self.compression_latency.labels(outcome=outcome).observe(seconds)
        if outcome == "failed":
            self.fail_open.inc()

    def refused(self, reason: str) -> None:
        self.refused_requests.labels(reason=reason).inc()

    def upstream_answered(self, seconds: float, status: int | None) -> None:
        self.upstream_latency.observe(seconds)
        if status is None:
            self.upstream_errors.labels(status_class="transport").inc()
        elif status >= 400:
            self.upstream_errors.labels(status_class=status_class(status)).inc()

    def finished(
        self, family: str, status: int, stream: bool, seconds: float, tokens_in: int, tokens_saved: int, tokens_forwarded: int
    ) -> None:
        self.requests.labels(status_class=status_class(status)).inc()
        self.latency.labels(stream=str(stream).lower()).observe(seconds)
        self.tokens_in.labels(model_family=family).inc(tokens_in)
        # A counter only grows: lossless mode's retrieve rounds can make a request's saving negative.
        self.tokens_saved.labels(model_family=family).inc(max(0, tokens_saved))
        self.tokens_forwarded.labels(model_family=family).inc(tokens_forwarded)

    def retrieved(self, rounds: int, found: int, missing: int) -> None:
        self.retrieve_rounds.inc(rounds)
        self.retrieve_calls.labels(result="found").inc(found)
        self.retrieve_calls.labels(result="missing").inc(missing)


@lru_cache(maxsize=1)
def gateway_metrics() -> GatewayMetrics:
    from prometheus_client import Counter, Histogram

    return GatewayMetrics(
        tokens_in=Counter("tokens_in", "Prompt tokens received, before compression.", ["model_family"]),
        tokens_saved=Counter("tokens_saved", "Prompt tokens removed by compression.", ["model_family"]),
        tokens_forwarded=Counter("tokens_forwarded", "Prompt tokens sent to the upstream.", ["model_family"]),
        requests=Counter("requests", "Proxied chat completions by status class.", ["status_class"]),
        latency=Histogram(
            "req_latency_seconds", "End-to-end latency of a chat completion.", ["stream"], buckets=LATENCY_BUCKETS
        ),
        compression_latency=Histogram(
            "compression_latency_seconds", "Time spent compressing a request.", ["outcome"], buckets=LATENCY_BUCKETS
        ),
        fail_open=Counter("compression_fail_open", "Compressor failures that forwarded the original request."),
        upstream_latency=Histogram(
            "upstream_latency_seconds", "Time until the upstream's response headers.", buckets=LATENCY_BUCKETS
        ),
        upstream_errors=Counter(
            "upstream_errors", "Upstream answers >= 400 and transport failures.", ["status_class"]
        ),
        refused_requests=Counter(
            "requests_refused",
            "Chat and compress requests refused before any work by a rate limit (requests_per_minute, "
            "tokens_per_minute) or the concurrency cap (overloaded).",
            ["reason"],
        ),
        retrieve_rounds=Counter(
            "retrieve_rounds", "Lossless mode: extra upstream calls made to answer ccproxy_retrieve."
        ),
        retrieve_calls=Counter(
            "retrieve_calls",
            "Lossless mode: ccproxy_retrieve calls answered, by whether the id was held (found) or not (missing).",
            ["result"],
        ),
    )


@dataclass(frozen=True)
class UsageMetrics:
    """The usage pipeline's health: the flusher's FlushObserver and the recorder's drop count.
    No labels, so every series exists (at 0) from the start and an alert's increase() sees the
    first dead letter; the reasons are in the log and in the dead-letter table."""

    dead_letters: Any
    dropped: Any
    outbox_pending: Any
    outbox_oldest_age: Any

    def dead_lettered(self, count: int) -> None:
        self.dead_letters.inc(count)

    def outbox_state(self, pending: int, oldest_age_s: float) -> None:
        self.outbox_pending.set(pending)
        self.outbox_oldest_age.set(oldest_age_s)

    def dropped_event(self) -> None:
        self.dropped.inc()


@lru_cache(maxsize=1)
def usage_metrics() -> UsageMetrics:
    from prometheus_client import Counter, Gauge

    # Every worker's flusher reads the same outbox file: the live workers' maximum is its state.
    return UsageMetrics(
        dead_letters=Counter(
            "usage_dead_letters", "Usage events set aside in ccproxy_usage_dead_letters: never storable."
        ),
        dropped=Counter(
            "usage_events_dropped", "Usage events lost: the outbox, the spill file and the memory bound all refused."
        ),
        outbox_pending=Gauge(
            "usage_outbox_pending", "Usage events waiting in the outbox.", multiprocess_mode="livemax"
        ),
        outbox_oldest_age=Gauge(
            "usage_outbox_oldest_age_seconds",
            "Age of the oldest usage event waiting in the outbox (0 when empty).",
            multiprocess_mode="livemax",
        ),
    )


@lru_cache(maxsize=1)
def _gpu_gauges() -> tuple[Any, Any]:
    from prometheus_client import Gauge

    return (
        Gauge("gpu_memory_used_bytes", "CUDA memory in use on the device (all processes).", ["device"], multiprocess_mode="max"),
        Gauge("gpu_memory_total_bytes", "CUDA memory of the device.", ["device"], multiprocess_mode="max"),
    )


def report_gpu_memory() -> None:
    """Sets the GPU memory gauges from CUDA; nothing where there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        return
    used, total = _gpu_gauges()
    for index in range(torch.cuda.device_count()):
        free_bytes, total_bytes = torch.cuda.mem_get_info(index)
        used.labels(device=str(index)).set(total_bytes - free_bytes)
        total.labels(device=str(index)).set(total_bytes)


class MetricsTokenMiddleware:
    """Requires ``Authorization: Bearer <token>`` on ``/metrics`` when a token is configured."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._expected is None or scope["type"] != "http" or scope["path"].rstrip("/") != "/metrics":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(sent, self._expected):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": {"message": "A valid metrics token is required.", "type": "invalid_request_error",
                       "param": None, "code": "invalid_metrics_token"}}
        ).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
