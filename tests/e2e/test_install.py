"""`pip install .` into a clean virtual environment, as an operator who only proxies: no compiler,
no torch, no llama.cpp. Its `ccproxy` command creates a key and serves a Gateway that proxies to
llama.cpp's `llama-server` and compresses through a Compressor on another host (issue 19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from harness.servers import REPO, free_port, running
from tests.e2e.conftest import UPSTREAM_KEY, gateway_env

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("CCPROXY_", "VIRTUAL_ENV"))}, **extra}


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("clean-install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # Wheels only for every dependency: a package that would compile (llama-cpp-python) fails the
    # install instead of building. ccproxy itself is built from this checkout (pure Python).
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--only-binary=:all:", "--no-binary=ccproxy", str(REPO)],
        capture_output=True, text=True, timeout=1200, env=_env(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return venv


def test_a_plain_install_carries_neither_torch_nor_llama_cpp(clean_venv: Path) -> None:
    python = str(clean_venv / "bin" / "python")
    for module in ("torch", "llama_cpp", "transformers"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, cwd="/", env=_env())
        assert probe.returncode != 0, f"{module} was installed by a plain `pip install ccproxy`"
    where = subprocess.run([python, "-c", "import ccproxy; print(ccproxy.__file__)"], capture_output=True, text=True,
                           cwd="/", env=_env(), check=True)
    assert str(clean_venv) in where.stdout  # the installed copy, not this checkout


def test_the_ccproxy_command_creates_a_key_and_serves_a_compressing_proxy(
    clean_venv: Path, llama_server: str, remote_compressor: str, database_url: str, logs_dir: Path,
    rag_messages: list[dict], tmp_path: Path,
) -> None:
    ccproxy_command = str(clean_venv / "bin" / "ccproxy")
    created = subprocess.run(
        [ccproxy_command, "keys", "create", "--account", "clean-install", "--json"], capture_output=True, text=True,
        cwd=tmp_path, env=_env(CCPROXY_DATABASE_URL=database_url), timeout=60,
    )
    assert created.returncode == 0, created.stderr[-3000:]
    key = json.loads(created.stdout)["key"]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = gateway_env(f"{llama_server}/v1", remote_compressor, database_url, tmp_path / "data")
    # Run from outside the checkout, so nothing is imported from it.
    with running([ccproxy_command, "serve", "--host", "127.0.0.1", "--port", str(port)], probe_url=f"{base}/readyz",
                 log=logs_dir / "clean-install.log", env=env, cwd=tmp_path):
        with openai.OpenAI(base_url=f"{base}/v1", api_key=UPSTREAM_KEY, default_headers={"x-api-key": key},
                           max_retries=0, timeout=180) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=rag_messages, max_tokens=8, extra_headers={"x-compression-ratio": "0.2"},
            )
    completion = raw.parse()
    assert completion.choices[0].message.content is not None
    assert raw.headers["x-compression"] == "compressed"
    assert int(raw.headers["x-tokens-after"]) < int(raw.headers["x-tokens-before"])
    # The upstream billed what ccproxy forwarded (its own count of the compressed prompt).
    assert completion.usage is not None and completion.usage.prompt_tokens <= int(raw.headers["x-tokens-before"])
