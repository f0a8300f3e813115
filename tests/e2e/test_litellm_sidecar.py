"""A real LiteLLM proxy with its ``headroom`` guardrail pointed at ccproxy (docs/SIDECAR.md).

LiteLLM (``make litellm``: .venv-litellm/, tests/e2e/litellm-requirements.txt) runs without a
database in front of two upstreams: llama.cpp's OpenAI server (SmolLM2) and a scripted one. Its
guardrail calls ccproxy's ``POST /v1/compress`` before each request and, when the model calls the
``headroom_retrieve`` tool it adds, ``GET /v1/retrieve/{id}``. Checked: a RAG chat reaches llama.cpp
compressed, ccproxy books a ``compress`` usage event to the guardrail's key, LiteLLM's own logging
payload (what its spend logs store) carries ccproxy's figures, and the retrieve loop brings the
original text back to the model, for the compressing account only.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from harness.servers import REPO, create_key, free_port, running
from nqdata.items import Item
from tests.e2e.conftest import UPSTREAM_KEY
from tests.e2e.usage_db import wait_for_events

pytestmark = pytest.mark.e2e

ACCOUNT = "litellm-sidecar"
MASTER_KEY = "sk-litellm-master-0d6c1e9a4b7f2c35"  # LiteLLM refuses to start without one
SCRIPTED_KEY = "sk-scripted-upstream"

# What LiteLLM calls for ccproxy: the three lines of docs/SIDECAR.md (guardrail, api_base, api_key),
# the hook (pre_call) and default_on so that every request goes through it.
CONFIG = """\
model_list:
  - model_name: smollm2
    litellm_params:
      model: openai/smollm2-upstream
      api_base: {llama}
      api_key: {llama_key}
  - model_name: scripted
    litellm_params:
      model: openai/scripted
      api_base: {scripted}
      api_key: {scripted_key}
guardrails:
  - guardrail_name: ccproxy
    litellm_params:
      guardrail: headroom
      mode: pre_call
      default_on: true
      api_base: {ccproxy}
      api_key: {ccproxy_key}
litellm_settings:
  callbacks: ["sidecar_log.recorder"]
"""

# A LiteLLM callback: each request's standard logging payload (what LiteLLM's spend logs keep), one
# JSON line each, to $SIDECAR_LOG.
CALLBACK = """\
import json, os
from litellm.integrations.custom_logger import CustomLogger


class Recorder(CustomLogger):
    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        payload = kwargs.get("standard_logging_object") or {}
        line = {key: payload.get(key) for key in ("model_group", "prompt_tokens", "guardrail_information")}
        with open(os.environ["SIDECAR_LOG"], "a") as sink:
            sink.write(json.dumps(line, default=str) + "\\n")


recorder = Recorder()
"""


def litellm_binary() -> Path:
    venv = Path(os.environ.get("CCPROXY_LITELLM_VENV") or REPO / ".venv-litellm")
    binary = venv / "bin" / "litellm"
    if not binary.is_file():
        pytest.fail(f"LiteLLM's proxy is not installed: {binary} is missing. Run `make litellm`.", pytrace=False)
    return binary


def chat_rag(item: Item) -> list[dict[str, Any]]:
    """A RAG chat as a chat application sends it: the search results as an earlier message, the
    question last. (The guardrail never sends the last user message to be compressed, so the
    one-message form, documents and question together, would reach the upstream as it is.)"""
    return [
        {"role": "system", "content": "Answer the question using only the search results."},
        {"role": "user", "content": "Search results:\n\n" + "\n\n".join(item.document_texts())},
        {"role": "assistant", "content": "I have read the search results. What is your question?"},
        {"role": "user", "content": f"Question: {item.question}\nAnswer:"},
    ]


# --- a scripted upstream: asks for a marker's original once, then says what it got back ----------


class Scripted(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).requests.append(body)
        messages = body.get("messages") or []
        tools = [tool.get("function", {}).get("name") for tool in body.get("tools") or []]
        results = [m for m in messages if m.get("role") == "tool"]
        refs = re.findall(r"hash=([0-9a-f]{12,24})\]", json.dumps(messages))
        if results:
            message: dict[str, Any] = {"role": "assistant", "content": "RETRIEVED " + str(results[-1]["content"])}
            finish = "stop"
        elif "headroom_retrieve" in tools and refs:
            call = {"id": "call_r1", "type": "function",
                    "function": {"name": "headroom_retrieve", "arguments": json.dumps({"hash": refs[0]})}}
            message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": "NO MARKER"}, "stop"
        answer = {
            "id": f"chatcmpl-{len(type(self).requests)}", "object": "chat.completion", "created": 0,
            "model": "scripted", "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def scripted_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


# --- the servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sidecar_key(database_url: str) -> str:
    return create_key({"CCPROXY_DATABASE_URL": database_url}, ACCOUNT)


@pytest.fixture(scope="module")
def litellm_proxy(
    keyed_gateway: str, sidecar_key: str, llama_upstream: str, scripted_upstream: str, logs_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Path]]:
    """LiteLLM's proxy, no database; yields its base URL and the callback's log."""
    binary = litellm_binary()
    home = tmp_path_factory.mktemp("litellm")
    (home / "config.yaml").write_text(CONFIG.format(
        llama=llama_upstream, llama_key=UPSTREAM_KEY, scripted=scripted_upstream, scripted_key=SCRIPTED_KEY,
        ccproxy=keyed_gateway, ccproxy_key=sidecar_key,
    ))
    (home / "sidecar_log.py").write_text(CALLBACK)
    seen = home / "logged.jsonl"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price map (no internet in CI)
        "SIDECAR_LOG": str(seen),
        "PYTHONPATH": str(home),
    }
    # No database (env -u: not one from the caller's environment either): LiteLLM keeps no spend
    # logs then, and the callback's log is its record.
    command = ["env", "-u", "DATABASE_URL", str(binary), "--config", str(home / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)]
    with running(command, probe_url=f"{base}/health/liveliness", log=logs_dir / "litellm.log", env=env):
        yield base, seen


def logged(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def headroom_entries(line: dict[str, Any]) -> list[dict[str, Any]]:
    entries = line.get("guardrail_information") or []
    entries = [entries] if isinstance(entries, dict) else entries
    return [entry for entry in entries if entry.get("guardrail_provider") == "headroom"]


# --- the tests -----------------------------------------------------------------------------------


def test_a_rag_chat_through_litellm_reaches_llama_cpp_compressed(
    litellm_proxy: tuple[str, Path], rag_item: Item, database_url: str
) -> None:
    base, seen = litellm_proxy
    client = OpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, timeout=300, max_retries=0)
    messages = chat_rag(rag_item)
    # The guardrail's own bypass header: the same request, not compressed, for the baseline.
    plain = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=8, extra_headers={"x-headroom-bypass": "true"}
    )
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=messages, max_tokens=8)
    compressed = raw.parse()
    assert plain.usage is not None and compressed.usage is not None
    print(f"\nllama.cpp prompt tokens: {plain.usage.prompt_tokens} plain, {compressed.usage.prompt_tokens} through ccproxy")
    assert plain.usage.prompt_tokens > 2000  # 20 documents
    assert compressed.usage.prompt_tokens < 0.75 * plain.usage.prompt_tokens
    assert "ccproxy" in raw.headers.get("x-litellm-applied-guardrails", "")

    # ccproxy booked the compression to the guardrail's key, and LiteLLM logged the same figures.
    (event,) = [e for e in wait_for_events(database_url, ACCOUNT, 1) if e["kind"] == "compress"]
    assert event["compression"] == "compressed"
    assert event["tokens_after"] < event["tokens_before"]
    assert event["tokens_before"] - event["tokens_after"] > 0.25 * plain.usage.prompt_tokens
    lines = [line for line in logged(seen) if line["model_group"] == "smollm2"]
    assert len(lines) == 2
    assert headroom_entries(lines[0]) == [] or all(e["guardrail_status"] != "success" for e in headroom_entries(lines[0]))
    (entry,) = headroom_entries(lines[1])
    figures = entry["guardrail_response"]
    assert entry["guardrail_status"] == "success"
    assert (figures["tokens_before"], figures["tokens_after"], figures["tokens_saved"]) == (
        event["tokens_before"], event["tokens_after"], event["tokens_before"] - event["tokens_after"]
    )
    assert figures["compression_ratio"] == round(event["tokens_after"] / event["tokens_before"], 4)
    assert lines[1]["prompt_tokens"] == compressed.usage.prompt_tokens


def test_the_retrieve_loop_brings_the_original_back_for_the_compressing_account_only(
    litellm_proxy: tuple[str, Path], keyed_gateway: str, sidecar_key: str, rag_item: Item, database_url: str
) -> None:
    base, _ = litellm_proxy
    Scripted.requests.clear()
    client = OpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, timeout=300, max_retries=0)
    answer = client.chat.completions.create(model="scripted", messages=chat_rag(rag_item), max_tokens=8)

    first, *follow_up = Scripted.requests
    # The upstream saw the documents shortened, a marker naming an id, and the retrieve tool.
    documents = first["messages"][1]["content"]
    (ref,) = re.findall(r"Retrieve original: hash=([0-9a-f]{24})\]", documents)
    assert len(documents) < len(chat_rag(rag_item)[1]["content"])
    assert [tool["function"]["name"] for tool in first["tools"]] == ["headroom_retrieve"]
    # It called the tool; LiteLLM fetched the original from ccproxy and sent it back as the result.
    assert len(follow_up) == 1
    original = chat_rag(rag_item)[1]["content"]
    assert follow_up[0]["messages"][-1] == {"role": "tool", "tool_call_id": "call_r1", "content": original}
    assert answer.choices[0].message.content == "RETRIEVED " + original

    # The id is the compressing account's: its key reads it, another account's gets a 404.
    mine = httpx.get(f"{keyed_gateway}/v1/retrieve/{ref}", headers={"x-api-key": sidecar_key}, timeout=30)
    assert mine.status_code == 200 and mine.json()["original_content"] == original
    other = create_key({"CCPROXY_DATABASE_URL": database_url}, "litellm-sidecar-other")
    refused = httpx.get(f"{keyed_gateway}/v1/retrieve/{ref}", headers={"x-api-key": other}, timeout=30)
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "not_found"
    assert ref not in refused.text
