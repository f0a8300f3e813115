"""BentoML wiring only: which services exist, what they hold, how they reach each other.

``bentoml serve`` starts the Gateway (the OpenAI-compatible API). When no upstream URL is
configured, the Gateway depends on EmbeddedLLM, which answers with SmolLM2 via llama.cpp.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import bentoml

from ccproxy.app import create_app
from ccproxy.embedded import EmbeddedEngine
from ccproxy.settings import get_settings
from ccproxy.upstream import EmbeddedUpstream, HttpUpstream, Upstream

settings = get_settings()
traffic = {"timeout": settings.request_timeout_s}


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
    if settings.upstream_url is None:
        embedded_llm = bentoml.depends(EmbeddedLLM)

    def __init__(self) -> None:
        self.upstream: Upstream = (
            HttpUpstream(settings) if settings.upstream_url else EmbeddedUpstream(self.embedded_llm)
        )
        app.state.upstream = self.upstream

    async def __is_ready__(self) -> bool:
        return await self.upstream.ready()

    async def __shutdown__(self) -> None:
        await self.upstream.aclose()
