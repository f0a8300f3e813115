"""Start real servers on loopback for end-to-end tests, and stop them for sure."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float, ok: set[int]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code in ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout_s}s:\n{log.read_text()[-4000:]}")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``. BentoML's workers start their own sessions, so killing the
    server's process group does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie: a zombie has closed its sockets already."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_tree(process: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGKILL for a server and everything it started, as a crash or an OOM kill would do; returns
    once every one of them is gone. SIGKILL is asynchronous: a worker that is still freeing its
    memory keeps its listening socket open, and connections it accepts then are reset."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout_s)
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {[pid for pid in pids if _alive(pid)]} outlived SIGKILL")
        time.sleep(0.01)


@contextmanager
def running(
    command: list[str],
    *,
    probe_url: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 180,
    ok_statuses: frozenset[int] = frozenset({200}),
    cwd: Path = REPO,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` in its own process group until the block ends."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    # Each `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts: servers
    # sharing one home would wipe each other's metrics, so each gets its own beside its log.
    child_env["BENTOML_HOME"] = str(log.parent / f"{log.stem}-bentoml-home")
    child_env.update(env or {})
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=cwd, env=child_env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until(probe_url, process, log, timeout_s, set(ok_statuses))
        yield process
    finally:
        left_behind = descendants(process.pid)
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if process.poll() is not None:
                break
            try:
                os.killpg(process.pid, sig)
                process.wait(wait_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        for pid in left_behind:  # workers in sessions of their own, if they outlived the server
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ccproxy_cli(args: list[str], env: Mapping[str, str]) -> str:
    """``python -m ccproxy ...`` against the database ``env`` names; its stdout."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    done = subprocess.run(
        [sys.executable, "-m", "ccproxy", *args], cwd=REPO, env={**child_env, **env},
        capture_output=True, text=True, timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ccproxy {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def create_key(env: Mapping[str, str], account: str) -> str:
    created = json.loads(ccproxy_cli(["--json", "keys", "create", "--account", account], env))
    return str(created["key"])


def bentoml_serve(port: int, service: str = "service:Gateway") -> list[str]:
    if service == "service:Gateway":  # as an operator starts it: `ccproxy serve`
        return [sys.executable, "-m", "ccproxy", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return [sys.executable, "-m", "bentoml", "serve", service, "--host", "127.0.0.1", "--port", str(port)]


def llama_cpp_server(port: int, model: Path, api_key: str | None = None) -> list[str]:
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "4096", "--model_alias", "smollm2-upstream",
    ]
    return command + (["--api_key", api_key] if api_key else [])


def llama_server_binary() -> Path:
    """llama.cpp's native ``llama-server``, as ``make llama-server`` (tools/build_llama_server.sh)
    installs it: ``$CCPROXY_LLAMA_SERVER`` when set, else the cache directory for the
    llama-cpp-python version pinned in pyproject.toml. Raises FileNotFoundError, with the way out,
    when it is not there."""
    override = os.environ.get("CCPROXY_LLAMA_SERVER")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"CCPROXY_LLAMA_SERVER={override} is not an executable file")
        return path
    pin = re.search(r'"llama-cpp-python==([0-9][0-9A-Za-z.]*)"', (REPO / "pyproject.toml").read_text())
    if pin is None:
        raise FileNotFoundError("no llama-cpp-python==<version> pin in pyproject.toml")
    cache = Path(
        os.environ.get("CCPROXY_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ccproxy"
    )
    path = cache / f"llama-server-{pin.group(1)}" / "llama-server"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(
            f"llama-server is not built: {path} is missing. Run `make llama-server` "
            "(tools/build_llama_server.sh), or point CCPROXY_LLAMA_SERVER at a llama-server binary."
        )
    return path


def llama_server_command(
    port: int, model: Path, api_key: str | None = None, *, binary: Path | None = None, ctx_size: int = 8192
) -> list[str]:
    """llama.cpp's native server: OpenAI /v1/chat/completions and /v1/responses, Anthropic
    /v1/messages and /v1/messages/count_tokens. Jinja renders the GGUF's own chat template."""
    command = [
        str(binary or llama_server_binary()),
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--ctx-size", str(ctx_size), "--threads", "2", "--threads-batch", "2",
        "--alias", "smollm2-upstream", "--jinja", "--no-webui",
    ]
    return command + (["--api-key", api_key] if api_key else [])


def haproxy_config(gateway_port: int, gateway_ports: list[int], compressor_port: int | None = None,
                   compressor_ports: list[int] | None = None) -> str:
    """HAProxy in front of Gateways (and Compressors): round robin, health checks, a refused
    connection retried on another replica; each answer names its replica in ``x-backend``."""

    def backend(name: str, ports: list[int], health: str) -> str:
        servers = "\n".join(
            f"  server {name}{i} 127.0.0.1:{port} check inter 300 fall 2 rise 1" for i, port in enumerate(ports)
        )
        return (
            f"backend {name}s\n  balance roundrobin\n  option httpchk GET {health}\n"
            f"  http-response set-header x-backend %[srv_name]\n{servers}\n"
        )

    config = (
        # Each request's log line (stdout: the test's log file) says which replica answered, its
        # retries and how it ended (termination state), for a failure in CI.
        "global\n  maxconn 4096\n  log stdout format raw local0\n"
        "defaults\n  mode http\n  log global\n  option httplog\n"
        "  timeout connect 2s\n  timeout client 300s\n  timeout server 300s\n"
        # A dead replica's pooled connections fail after the request was sent (an empty
        # response): retried too, on another replica each time (redispatch 1).
        "  retries 2\n  option redispatch 1\n  retry-on conn-failure empty-response\n"
        f"frontend gateways\n  bind 127.0.0.1:{gateway_port}\n  default_backend gateways\n"
        + backend("gateway", gateway_ports, "/livez")
    )
    if compressor_port is not None and compressor_ports:
        config += (
            f"frontend compressors\n  bind 127.0.0.1:{compressor_port}\n  default_backend compressors\n"
            + backend("compressor", compressor_ports, "/readyz")
        )
    return config


@contextmanager
def haproxy(config: str, folder: Path, probe_url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Debian's haproxy with ``config``, checked first, until the block ends."""
    import shutil

    binary = shutil.which("haproxy")
    if binary is None:
        raise FileNotFoundError("haproxy is not installed (Debian: apt-get install -y haproxy; .ci/run does)")
    path = folder / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy refused its config:\n{check.stdout}{check.stderr}")
    with running([binary, "-db", "-f", str(path)], probe_url=probe_url, log=log) as process:
        yield process
