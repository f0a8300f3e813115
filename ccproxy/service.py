"""BentoML wiring only: which services exist, what they hold, how they reach each other.

``bentoml serve`` starts the Gateway (the OpenAI-compatible API) and what it depends on:
the Compressor (the QR-head scorer; remote when CCPROXY_COMPRESSOR_URL is set) and, when no
upstream URL is configured, EmbeddedLLM, which answers with SmolLM2 via llama.cpp.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import bentoml

from ccproxy.app import create_app
from ccproxy.auth import (
    OPEN_ACCOUNT,
    Authenticator,
    FailedAuthLimiter,
    KeyAuthenticator,
    KeyVerifier,
    OpenAccess,
    Principal,
)
from ccproxy.compression.gateway import ContextCompressor
from ccproxy.compression.offload import favour_the_event_loop, serial_tokenizers
from ccproxy.compression.policy import KeepHint
from ccproxy.compression.scoring import ScoreRequest, load_scorer, score_requests
from ccproxy.compressor_auth import CompressorTokenMiddleware, authorize_client
from ccproxy.embedded import EmbeddedEngine
from ccproxy.http_metrics import bound_endpoint_labels, static_paths
from ccproxy.logs import configure_access_log
from ccproxy.metrics import MetricsTokenMiddleware, gateway_metrics, report_gpu_memory, usage_metrics
from ccproxy.readiness import ReadinessProbe
from ccproxy.serving import ChatParts
from ccproxy.settings import get_settings
from ccproxy.spend import SpendGuard
from ccproxy.startup_checks import refuse_unsafe_start, writable_data_dir
from ccproxy.tokens import counter_for, loaded_counter
from ccproxy.upstream import EmbeddedUpstream, HttpUpstream, Upstream
from ccproxy.usage.flusher import UsageFlusher
from ccproxy.usage.outbox import Outbox
from ccproxy.usage.recorder import UsageRecorder
from ccproxy.usage.spill import SpillFile
from ccproxy.usage.store import UsageStore, open_store

settings = get_settings()
refuse_unsafe_start(settings)  # production mode: no open /metrics, no unauthenticated Compressor
compressor_token = settings.compressor_token.get_secret_value() if settings.compressor_token else None
traffic = {"timeout": settings.request_timeout_s}
compressor_resources = (
    {"gpu": settings.compressor_gpus} if settings.compressor_gpus else {"cpu": "2"}
)


@bentoml.service(name="ccproxy-compressor", traffic=traffic, resources=compressor_resources)
class Compressor:
    def __init__(self) -> None:
        self.scorer = load_scorer(settings)
        report_gpu_memory()

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.compressor_max_batch_size,
        max_latency_ms=settings.compressor_max_latency_ms,
    )
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        scores = score_requests(self.scorer, requests)
        report_gpu_memory()
        return scores


@bentoml.service(name="ccproxy-embedded-llm", traffic=traffic, resources={"cpu": "1"})
class EmbeddedLLM:
    def __init__(self) -> None:
        self.engine = EmbeddedEngine.load(settings)

    @bentoml.api
    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.engine.complete(body)

    @bentoml.api
    async def chat_stream(self, body: dict[str, Any]) -> AsyncGenerator[str, None]:
        async for text in self.engine.stream(body):
            yield text

    @bentoml.api
    async def models(self) -> dict[str, Any]:
        return self.engine.models()


app = create_app(settings)


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="ccproxy", traffic=traffic, workers=settings.gateway_workers)
class Gateway:
    compressor = bentoml.depends(Compressor, url=settings.compressor_url)
    if settings.upstream_url is None:
        embedded_llm = bentoml.depends(EmbeddedLLM)

    def __init__(self) -> None:
        serial_tokenizers()  # first: before any tokenizer has run in this worker
        if compressor_token:  # X-Compressor-Token on every call, set before the first one
            authorize_client(self.compressor.to_async, compressor_token)
        self.upstream: Upstream = (
            HttpUpstream(settings) if settings.upstream_url else EmbeddedUpstream(self.embedded_llm)
        )
        self.readiness = ReadinessProbe(self.upstream.ready)
        self.anthropic_upstream: Upstream | None = (
            HttpUpstream(settings, anthropic=True) if settings.anthropic_upstream_url else None
        )
        data_dir = writable_data_dir(settings.data_dir)  # the SQLite store and the outbox live there
        # Apart: the flusher's writes may wait on an unreachable database, which must not hold
        # up key checks and /usage reads on the request path. Those share a pool of 4 per
        # worker (Postgres), so a slow read does not hold up the others either.
        self.store: UsageStore = open_store(settings, pool_size=4)
        self.store.migrate()
        self.flusher_store: UsageStore = open_store(settings)
        outbox = Outbox(data_dir / "usage-outbox.sqlite")
        self.flusher = UsageFlusher(
            outbox,
            self.flusher_store,
            settings.usage_flush_interval_s,
            settings.usage_flush_batch_size,
            observer=usage_metrics(),
        )
        # Before the first request: events spilled by the last run go back to the outbox now.
        recorder = UsageRecorder(
            outbox, SpillFile(data_dir / "usage-spill.jsonl"), on_drop=usage_metrics().dropped_event
        )
        self.flusher.start()
        counter_for(None, settings)  # load the default tokenizer now, not on the first request
        app.state.parts = ChatParts(
            upstream=self.upstream,
            compressor=ContextCompressor(self._score, settings),
            counter_for=lambda model: counter_for(model, settings),
            loaded_counter=lambda model: loaded_counter(model, settings),
            recorder=recorder,
            metrics=gateway_metrics(),
            allowed_models=settings.allowed_models,
            # Built even without a cap: it reads the price table, so a bad one fails the start.
            spend_guard=SpendGuard.from_settings(self.store, settings),
            anthropic=self.anthropic_upstream,
            responses_bridged=settings.upstream_responses == "bridge",
            retrieve_max_rounds=settings.retrieve_max_rounds,
        )
        configure_access_log()
        app.state.gate = self._gate()
        app.state.store = self.store
        favour_the_event_loop()  # last: large requests' work in threads must not stall the others

    def _gate(self) -> Authenticator:
        if settings.auth_mode == "open":
            return OpenAccess(Principal(self.store.ensure_account(OPEN_ACCOUNT), OPEN_ACCOUNT, None))
        verifier = KeyVerifier(
            self.store.find_key,
            settings.key_cache_ttl_s,
            max_stale_s=settings.key_cache_max_stale_s,
            negative_ttl_s=settings.key_negative_cache_ttl_s,
        )
        return KeyAuthenticator(
            verifier,
            server_holds_upstream_key=settings.upstream_api_key is not None,
            failures=FailedAuthLimiter(settings.auth_failures_per_minute),
        )

    async def _score(self, query: str, units: Sequence[str], hint: KeepHint | None = None) -> list[float]:
        [scores] = await self.compressor.to_async.score([ScoreRequest.of(query, units, hint)])
        return scores

    async def __is_ready__(self) -> bool:
        return await self.readiness()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        # Graceful stop: whatever usage is still buffered goes to the database now.
        await asyncio.to_thread(self.flusher.stop, 10)
        self.flusher_store.close()
        self.store.close()
        await self.upstream.aclose()
        if self.anthropic_upstream is not None:
            await self.anthropic_upstream.aclose()


metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
for protected in (Gateway, Compressor, EmbeddedLLM):
    protected.add_asgi_middleware(MetricsTokenMiddleware, token=metrics_token)
Compressor.add_asgi_middleware(CompressorTokenMiddleware, token=compressor_token)
# BentoML labels its request metrics with the raw path: unknown paths become endpoint="other".
bound_endpoint_labels(static_paths(app))
