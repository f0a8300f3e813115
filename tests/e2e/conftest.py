from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccproxy.embedded import embedded_gguf_path
from harness.postgres import fresh_database
from harness.servers import (
    bentoml_serve,
    create_key,
    free_port,
    llama_cpp_server,
    llama_server_binary,
    llama_server_command,
    running,
)
from nqdata.items import Item, load_records, random_distractor_items

UPSTREAM_KEY = "sk-upstream-test-key"
# The remote Compressor takes only calls with this shared secret; every gateway sends it.
COMPRESSOR_TOKEN = "compressor-test-token-5f2a9c"


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def embedded_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The embedded gateway keeps accounts and usage in the default SQLite file of its data dir."""
    return {"CCPROXY_DATA_DIR": str(tmp_path_factory.mktemp("embedded-data"))}


@pytest.fixture(scope="session")
def embedded_key(embedded_env: dict[str, str]) -> str:
    return create_key(embedded_env, "embedded-tests")


@pytest.fixture(scope="session")
def embedded_gateway(logs_dir: Path, embedded_env: dict[str, str]) -> Iterator[str]:
    """``bentoml serve`` with no upstream configured: the embedded SmolLM2 answers."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(bentoml_serve(port), probe_url=f"{base}/readyz", log=logs_dir / "embedded.log", env=embedded_env):
        yield base


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL, shared by the gateways in front of llama.cpp."""
    with fresh_database("ccproxy_e2e") as url:
        yield url


@pytest.fixture(scope="session")
def api_key(database_url: str) -> str:
    return create_key({"CCPROXY_DATABASE_URL": database_url}, "e2e")


@pytest.fixture(scope="session")
def llama_upstream(logs_dir: Path) -> Iterator[str]:
    """llama.cpp's own OpenAI server on the embedded GGUF, protected by an API key."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    command = llama_cpp_server(port, embedded_gguf_path(), api_key=UPSTREAM_KEY)
    with running(
        command, probe_url=f"{base}/models", log=logs_dir / "llama.log", ok_statuses=frozenset({200, 401})
    ):
        yield base


@pytest.fixture(scope="session")
def llama_server(logs_dir: Path) -> Iterator[str]:
    """llama.cpp's native ``llama-server`` on the embedded GGUF, protected by an API key: it serves
    OpenAI /v1/responses and Anthropic /v1/messages (+ count_tokens). Yields the base URL without
    /v1 (Anthropic clients add /v1 themselves; OpenAI clients want ``base + "/v1"``). Fails, not
    skips, when the binary is missing: ``make test`` builds it (``make llama-server``)."""
    try:
        binary = llama_server_binary()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = llama_server_command(port, embedded_gguf_path(), api_key=UPSTREAM_KEY, binary=binary)
    with running(command, probe_url=f"{base}/health", log=logs_dir / "llama-server.log"):
        yield base


@pytest.fixture(scope="session")
def remote_compressor(logs_dir: Path) -> Iterator[str]:
    """The Compressor served on its own, as on a separate GPU host; gateways reach it by URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(
        bentoml_serve(port, "service:Compressor"), probe_url=f"{base}/readyz", log=logs_dir / "compressor.log",
        env={"CCPROXY_COMPRESSOR_TOKEN": COMPRESSOR_TOKEN},
    ):
        yield base


def gateway_env(upstream_url: str, compressor_url: str, database_url: str, data_dir: Path) -> dict[str, str]:
    return {
        "CCPROXY_UPSTREAM_URL": upstream_url,
        "CCPROXY_COMPRESSOR_URL": compressor_url,
        "CCPROXY_COMPRESSOR_TOKEN": COMPRESSOR_TOKEN,
        "CCPROXY_DATABASE_URL": database_url,
        "CCPROXY_DATA_DIR": str(data_dir),
        "CCPROXY_USAGE_FLUSH_INTERVAL_S": "0.2",
        "CCPROXY_KEY_CACHE_TTL_S": "0",  # revocations bite at once in tests
    }


def _gateway_to(
    upstream_url: str, compressor_url: str, database_url: str, logs_dir: Path, name: str, **extra_env: str
) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**gateway_env(upstream_url, compressor_url, database_url, logs_dir / f"{name}-data"), **extra_env}
    with running(bentoml_serve(port), probe_url=f"{base}/livez", log=logs_dir / f"{name}.log", env=env):
        yield base


@pytest.fixture(scope="session")
def passthrough_gateway(
    llama_upstream: str, remote_compressor: str, database_url: str, logs_dir: Path
) -> Iterator[str]:
    """Points at the llama.cpp server and holds no key: callers bring their own."""
    yield from _gateway_to(llama_upstream, remote_compressor, database_url, logs_dir, "passthrough")


@pytest.fixture(scope="session")
def keyed_gateway(
    llama_upstream: str, remote_compressor: str, database_url: str, logs_dir: Path
) -> Iterator[str]:
    """Points at the llama.cpp server and holds its key."""
    yield from _gateway_to(
        llama_upstream, remote_compressor, database_url, logs_dir, "keyed", CCPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY
    )


@pytest.fixture(scope="session")
def dead_upstream_gateway(remote_compressor: str, database_url: str, logs_dir: Path) -> Iterator[str]:
    """Points at a loopback port where nothing listens."""
    yield from _gateway_to(f"http://127.0.0.1:{free_port()}/v1", remote_compressor, database_url, logs_dir, "dead")


@pytest.fixture(scope="session")
def rag_item() -> Item:
    # A fixed evaluation item: 20 documents (~3k tokens), the gold one somewhere inside.
    return random_distractor_items(load_records("eval"), 20, n_items=1, seed=11)[0]


@pytest.fixture(scope="session")
def rag_messages(rag_item: Item) -> list[dict]:
    return rag_item.messages()


# --- reliability (issue 9): a misbehaving upstream and a gateway in front of it -------------

FAULT_UPSTREAM_KEY = "sk-fault-upstream-9c1e7a4b2d"


@pytest.fixture(scope="session")
def fault_upstream(logs_dir: Path) -> Iterator[str]:
    """tests/e2e/fault_upstream.py: the request's model picks the fault."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "tests.e2e.fault_upstream", "--port", str(port)]
    with running(command, probe_url=f"{base}/models", log=logs_dir / "fault-upstream.log"):
        yield base


@pytest.fixture(scope="session")
def faults_gateway(fault_upstream: str, remote_compressor: str, database_url: str, logs_dir: Path) -> Iterator[str]:
    """Holds the upstream key, waits 2 s for the upstream, takes bodies up to 2 MiB."""
    yield from _gateway_to(
        fault_upstream, remote_compressor, database_url, logs_dir, "faults",
        CCPROXY_UPSTREAM_API_KEY=FAULT_UPSTREAM_KEY,
        CCPROXY_UPSTREAM_READ_TIMEOUT_S="2",
        CCPROXY_MAX_BODY_BYTES=str(2 * 1024 * 1024),
    )
