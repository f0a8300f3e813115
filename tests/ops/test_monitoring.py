"""The monitoring configs in deploy/: Prometheus rules and their unit tests, the scrape config,
Alertmanager's config, and a real Alertmanager delivering an alert to a fake Slack webhook.

Needs Debian's ``prometheus`` and ``prometheus-alertmanager`` packages (``promtool``, ``amtool``,
``prometheus-alertmanager``); each test is skipped, saying which package to install, where its
binary is absent.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from harness.servers import free_port, running

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager.yml"


def binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install -y {package})")
    return path


def run(command: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# --- Prometheus rules ---------------------------------------------------------------------------


def test_alert_rules_are_valid() -> None:
    done = run([binary("promtool", "prometheus"), "check", "rules", str(ALERTS)])
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_alert_rule_unit_tests_pass() -> None:
    done = run([binary("promtool", "prometheus"), "test", "rules", ALERTS_TEST.name], cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_test_and_a_quiet_test() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert {"CcproxyLatencyP99High", "CcproxyGpuMemoryHigh", "CcproxyUpstreamErrors",
            "CcproxyCompressionFailingOpen", "CcproxyUsageDeadLetters", "CcproxyUsageOutboxStale",
            "CcproxyUsageEventsDropped"} <= names
    assert names - fired == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"


def test_the_latency_and_gpu_alerts_keep_the_operator_story() -> None:
    """p99 > 5 s for 5 minutes; GPU memory > 90 % for 5 minutes."""
    rules = {rule["alert"]: rule for rule in alert_rules()}
    latency, gpu = rules["CcproxyLatencyP99High"], rules["CcproxyGpuMemoryHigh"]
    assert "histogram_quantile(0.99" in latency["expr"] and re.search(r"\)\s*>\s*5\s*$", latency["expr"])
    assert re.search(r">\s*0\.9\s*$", gpu["expr"])
    assert latency["for"] == gpu["for"] == "5m"


def _exported_metric_names() -> set[str]:
    """Sample names the Gateway's and the Compressor's collectors produce, found by creating them
    in a fresh interpreter (not this one's default registry)."""
    script = """
import json
from prometheus_client import REGISTRY
import ccproxy.metrics as metrics
metrics.gateway_metrics()
metrics.usage_metrics()
gpu = getattr(metrics, "_gpu_gauges", None)
if gpu is not None:
    gpu()
print(json.dumps({family.name: family.type for family in REGISTRY.collect()}))
"""
    done = run([sys.executable, "-c", script])
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    families = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name + suffix for name, kind in families.items() for suffix in suffixes.get(kind, [""])}
    if "_gpu_gauges" not in (REPO / "ccproxy" / "metrics.py").read_text():  # the gauges live elsewhere now
        names |= {"gpu_memory_used_bytes", "gpu_memory_total_bytes"}
    return names


def test_alerts_use_only_metrics_the_services_export() -> None:
    used = set()
    for rule in alert_rules():
        used |= set(re.findall(r"\b[a-z][a-z0-9_]*_(?:total|bucket|count|sum|bytes|seconds)\b", rule["expr"]))
    assert {"req_latency_seconds_bucket", "gpu_memory_used_bytes", "upstream_errors_total",
            "compression_fail_open_total", "usage_dead_letters_total", "usage_events_dropped_total"} <= used
    assert used - _exported_metric_names() == set()


# --- Prometheus scrape config ------------------------------------------------------------------


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    promtool = binary("promtool", "prometheus")
    run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)])
    # The full check also opens the rule files and the token files: give it a token file.
    token = tmp_path / "ccproxy_metrics_token"
    token.write_text("s3cret\n")
    config = PROMETHEUS_CONFIG.read_text().replace("/etc/prometheus/secrets/ccproxy_metrics_token", str(token))
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    done = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert "SUCCESS: 1 rule files found" in done.stdout


def test_prometheus_scrapes_with_the_metrics_token_from_a_file() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) >= {"ccproxy-gateway", "ccproxy-compressor"}
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"
        assert job["authorization"]["type"] == "Bearer"
        assert "credentials_file" in job["authorization"] and "credentials" not in job["authorization"]
    assert config["rule_files"] == ["alerts.yml"]


# --- Alertmanager -------------------------------------------------------------------------------


def test_alertmanager_config_is_valid() -> None:
    done = run([binary("amtool", "prometheus-alertmanager"), "check-config", str(ALERTMANAGER_CONFIG)])
    assert "SUCCESS" in done.stdout


def test_slack_webhook_url_comes_from_a_file() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert "slack_api_url" not in config["global"]
    assert config["global"]["slack_api_url_file"].startswith("/")
    for receiver in config["receivers"]:
        for slack in receiver.get("slack_configs", []):
            assert "api_url" not in slack
    assert "hooks.slack.com/services/" not in ALERTMANAGER_CONFIG.read_text().replace(
        "https://hooks.slack.com/services/…", ""
    )


class _FakeSlack(BaseHTTPRequestHandler):
    received: queue.Queue[tuple[str, dict]] = queue.Queue()

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.received.put((self.path, json.loads(body)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_: object) -> None:
        return None


@pytest.fixture
def fake_slack() -> Iterator[tuple[str, queue.Queue[tuple[str, dict]]]]:
    _FakeSlack.received = queue.Queue()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSlack)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/XXXX", _FakeSlack.received
    finally:
        server.shutdown()
        server.server_close()


def test_alertmanager_pages_slack_with_the_alert(tmp_path: Path, fake_slack) -> None:
    """A real Alertmanager on the shipped config (webhook URL file pointed at a fake Slack,
    group_wait shortened) posts a firing page to the channel with its summary and an @here."""
    alertmanager = binary("prometheus-alertmanager", "prometheus-alertmanager")
    webhook_url, received = fake_slack
    secret = tmp_path / "slack_webhook_url"
    secret.write_text(webhook_url + "\n")
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    config["global"]["slack_api_url_file"] = str(secret)
    config["route"]["group_wait"] = "0s"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        alertmanager, f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
    ]
    with running(command, probe_url=f"{base}/-/ready", log=tmp_path / "alertmanager.log", timeout_s=60):
        alert = {
            "labels": {"alertname": "CcproxyLatencyP99High", "severity": "page", "stream": "false",
                       "job": "ccproxy-gateway", "instance": "gw-1:3000"},
            "annotations": {"summary": "ccproxy p99 latency is 9.7s (stream=false)",
                            "description": "p99 above 5 s for 5 minutes.", "runbook": "docs/DEPLOY.md#alerts"},
            "startsAt": datetime.now(timezone.utc).isoformat(),
        }
        assert httpx.post(f"{base}/api/v2/alerts", json=[alert], timeout=10).status_code == 200
        try:
            path, message = received.get(timeout=30)
        except queue.Empty:
            pytest.fail(f"no Slack message; alertmanager log:\n{(tmp_path / 'alertmanager.log').read_text()[-3000:]}")
    assert path == "/services/T000/B000/XXXX"
    assert message["channel"] == "#ccproxy-alerts"
    [attachment] = message["attachments"]
    assert attachment["title"] == "[FIRING:1] CcproxyLatencyP99High (page)"
    assert "<!here>" in attachment["pretext"]
    assert attachment["color"] == "danger"
    assert "*ccproxy p99 latency is 9.7s (stream=false)*" in attachment["text"]
    assert "Instance: `gw-1:3000`" in attachment["text"] and "docs/DEPLOY.md#alerts" in attachment["text"]


# --- Fly.io -------------------------------------------------------------------------------------


def test_fly_gateway_checks_readyz_and_autoscales() -> None:
    fly = tomllib.loads((DEPLOY / "fly.toml").read_text())
    service = fly["http_service"]
    assert service["internal_port"] == 3000
    assert service["auto_stop_machines"] in ("stop", "suspend", True)
    assert service["min_machines_running"] >= 1
    assert any(check["path"] == "/readyz" for check in service["checks"])
    env = fly["env"]
    assert env["CCPROXY_COMPRESSOR_URL"].startswith("http")
    # A Compressor outage must not make every Gateway unready (requests fail open instead).
    assert env["BENTOML_CONFIG_OPTIONS"] == "services.ccproxy.runner_probe.enabled=false"



# --- the Bento's image --------------------------------------------------------------------------


def test_bento_image_has_the_gpu_packages_and_the_build_env(tmp_path: Path) -> None:
    """`bentoml build` into a scratch BENTOML_HOME; the Dockerfile BentoML would build from it
    sets CMAKE_ARGS and OMP_WAIT_POLICY before the packages install (BentoML 1.4 drops
    `docker.env`, so they must come from `envs`), and the requirements carry CUDA torch and
    bitsandbytes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    env.update(BENTOML_HOME=str(tmp_path / "home"), BENTOML_DO_NOT_TRACK="true")
    script = """
import sys
from bentoml.bentos import build_bentofile
from bentoml._internal.container import construct_containerfile
bento = build_bentofile("bentofile.yaml", build_ctx=".")
with construct_containerfile(bento, enable_buildkit=False) as (_, dockerfile):
    sys.stdout.write(open(dockerfile).read())
sys.stdout.write("\\n--- requirements ---\\n")
sys.stdout.write(open(bento.path_of("env/python/requirements.txt")).read())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    dockerfile, requirements = done.stdout.split("\n--- requirements ---\n")
    install = dockerfile.index("pip install -r")
    for line in ("ENV CMAKE_ARGS=$CMAKE_ARGS", "ARG CMAKE_ARGS=-DGGML_NATIVE=OFF", "ENV OMP_WAIT_POLICY=$OMP_WAIT_POLICY"):
        assert -1 < dockerfile.index(line) < install, line
    wanted = {"torch==2.13.0", "bitsandbytes>=0.45", "peft>=0.13", "llama-cpp-python==0.3.36", "tiktoken>=0.8"}
    assert wanted <= set(requirements.split())
