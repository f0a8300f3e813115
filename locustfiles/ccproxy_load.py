"""Load scenarios for ccproxy: the request shapes of the OpenAI chat completions API.

User classes (name one or several on locust's command line):

- ``ShortChat``      — a system prompt and one short question (~30 tokens), non-streaming.
- ``StreamingChat``  — the same with ``stream: true`` and ``stream_options.include_usage``; reports
  the whole stream as ``stream total`` and the first content delta as ``stream first token``.
- ``Rag1k``          — a RAG prompt of ~1,100 tokens (1,012–1,100): NaturalQuestions passages
  (``nqdata/items.py``, evaluation part), the question last; ``shapes.rag_items`` builds them.
- ``Rag20k``         — the same at ~20,000 tokens (18,400–20,000).

Environment:

- ``LOAD_API_KEY``       the ccproxy key, sent as ``X-API-Key`` (unset: no such header, e.g. when
                         calling an upstream directly).
- ``LOAD_UPSTREAM_KEY``  sent as ``Authorization: Bearer`` (the caller's provider key); unset: none.
- ``LOAD_MODEL``         the ``model`` field (default ``gpt-4o-mini``, counted with o200k).
- ``LOAD_COMPRESSION``   ``on`` (default: the server decides) or ``off`` (``X-Compression: off``).
- ``LOAD_RATE``          requests per second per user (``constant_throughput``); 0, the default,
                         sends back to back.
- ``LOAD_SAMPLES``       a file that gets every request's exact latency as JSON lines when locust
                         quits (``bench/load.py`` takes its percentiles from them: locust's own
                         round to whole milliseconds, and coarser above 100 ms).
- ``LOAD_RAG_1K_TOKENS`` / ``LOAD_RAG_20K_TOKENS``  the RAG prompt sizes (1100 / 20000).

Against a running ccproxy::

    LOAD_API_KEY=ccp_... .venv/bin/locust -f locustfiles/ccproxy_load.py \\
        --host http://127.0.0.1:3000 --headless -u 4 -r 4 -t 30s Rag1k

``python -m bench.load`` (``make load``) serves the Bento against a fast upstream and runs them all.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, constant_throughput, events, task

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from locustfiles import shapes  # noqa: E402

API_KEY = os.environ.get("LOAD_API_KEY", "")
UPSTREAM_KEY = os.environ.get("LOAD_UPSTREAM_KEY", "")
MODEL = os.environ.get("LOAD_MODEL", "gpt-4o-mini")
COMPRESSION = os.environ.get("LOAD_COMPRESSION", "on").lower()
RATE = float(os.environ.get("LOAD_RATE", "0") or 0)
SAMPLES = os.environ.get("LOAD_SAMPLES")
RAG_1K_TOKENS = int(os.environ.get("LOAD_RAG_1K_TOKENS", "1100"))
RAG_20K_TOKENS = int(os.environ.get("LOAD_RAG_20K_TOKENS", "20000"))
CHAT_PATH = "/v1/chat/completions"


def _headers(stream: bool = False) -> dict[str, str]:
    return shapes.headers(API_KEY, UPSTREAM_KEY, COMPRESSION, stream)


def _has_content(sse_text: str) -> bool:
    """Whether a complete event in ``sse_text`` carries a non-empty content delta."""
    for event in sse_text.replace("\r\n", "\n").split("\n\n")[:-1]:
        for line in event.splitlines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            try:
                chunk = json.loads(line[5:])
            except ValueError:
                continue
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    return True
    return False


class _ChatUser(FastHttpUser):
    abstract = True
    wait_time = constant_throughput(RATE) if RATE > 0 else constant(0)
    # Long prompts on a CPU scorer take seconds: the client must not give up first.
    network_timeout = 600.0
    connection_timeout = 30.0

    def on_start(self) -> None:
        self.rng = random.Random(id(self))

    def post_chat(self, body: dict[str, Any], name: str) -> None:
        with self.client.post(
            CHAT_PATH, data=json.dumps(body), headers=_headers(), name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
            elif not (response.json().get("choices") or [{}])[0].get("message"):
                response.failure("no choices[0].message in the answer")


class ShortChat(_ChatUser):
    @task
    def short_chat(self) -> None:
        self.post_chat(shapes.short_chat_body(MODEL, self.rng), "short chat")


class StreamingChat(_ChatUser):
    @task
    def streaming_chat(self) -> None:
        started = time.perf_counter()
        first_token_ms: float | None = None
        with self.client.post(
            CHAT_PATH,
            data=json.dumps(shapes.short_chat_body(MODEL, self.rng, stream=True)),
            headers=_headers(stream=True),
            name="stream total",
            stream=True,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            # Line by line as the bytes arrive (iter_content(n) would wait for n bytes).
            raw = response._response
            text = ""
            while line := raw.readline(b"\n"):
                text += line.decode("utf-8", "replace")
                if first_token_ms is None and line.startswith(b"data:") and _has_content(line.decode() + "\n\n"):
                    first_token_ms = (time.perf_counter() - started) * 1000
            # The request's time is the whole stream's, not only its headers' (locust's default).
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            response.request_meta["response_length"] = len(text)
            if not text.rstrip().endswith("data: [DONE]"):
                response.failure("the stream did not end with data: [DONE]")
                return
            if first_token_ms is None:
                response.failure("no content delta in the stream")
                return
        self.environment.events.request.fire(
            request_type="SSE", name="stream first token", response_time=first_token_ms,
            response_length=0, exception=None, context={},
        )


class Rag1k(_ChatUser):
    @task
    def rag_1k(self) -> None:
        self.post_chat(shapes.rag_body(MODEL, self.rng.choice(shapes.rag_items(RAG_1K_TOKENS, 20))), "rag 1k")


class Rag20k(_ChatUser):
    @task
    def rag_20k(self) -> None:
        self.post_chat(shapes.rag_body(MODEL, self.rng.choice(shapes.rag_items(RAG_20K_TOKENS, 6))), "rag 20k")


# --- exact latencies for bench/load.py ---------------------------------------------------------
_samples: list[dict[str, Any]] = []


@events.request.add_listener
def _record(request_type: str, name: str, response_time: float, exception: Any, **_: Any) -> None:
    if SAMPLES:
        _samples.append({"name": name, "ms": response_time, "ok": exception is None, "end": time.time()})


@events.quitting.add_listener
def _write_samples(**_: Any) -> None:
    if SAMPLES:
        Path(SAMPLES).write_text("".join(json.dumps(sample) + "\n" for sample in _samples), encoding="utf-8")
