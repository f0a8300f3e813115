"""BentoML wiring only: which services exist, what they hold, how they reach each other.

``bentoml serve`` starts the Gateway (the OpenAI-compatible API) and what it depends on:
the Compressor (the QR-head scorer; remote when CCPROXY_COMPRESSOR_URL is set) and, when no
upstream URL is configured, EmbeddedLLM, which answers with SmolLM2 via llama.cpp.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

import bentoml

from ccproxy.app import create_app
from ccproxy.compression.gateway import ContextCompressor
from ccproxy.compression.scoring import ScoreRequest, load_scorer, score_requests
from ccproxy.embedded import EmbeddedEngine
from ccproxy.settings import get_settings
from ccproxy.tokens import default_counter
from ccproxy.upstream import EmbeddedUpstream, HttpUpstream, Upstream

settings = get_settings()
traffic = {"timeout": settings.request_timeout_s}
compressor_resources = (
    {"gpu": settings.compressor_gpus} if settings.compressor_gpus else {"cpu": "2"}
)


@bentoml.service(name="ccproxy-compressor", traffic=traffic, resources=compressor_resources)
class Compressor:
    def __init__(self) -> None:
        self.scorer = load_scorer(settings)

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.compressor_max_batch_size,
        max_latency_ms=settings.compressor_max_latency_ms,
    )
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        return score_requests(self.scorer, requests)


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
        self.upstream: Upstream = (
            HttpUpstream(settings) if settings.upstream_url else EmbeddedUpstream(self.embedded_llm)
        )
        app.state.upstream = self.upstream
        app.state.compressor = ContextCompressor(self._score, default_counter(), settings)

    async def _score(self, query: str, units: Sequence[str]) -> list[float]:
        [scores] = await self.compressor.to_async.score([ScoreRequest(query=query, units=list(units))])
        return scores

    async def __is_ready__(self) -> bool:
        return await self.upstream.ready()

    async def __shutdown__(self) -> None:
        await self.upstream.aclose()
