"""The one-host Compose stack (compose.yaml) and the Grafana dashboard (deploy/grafana/), checked
with real parsers; docker and Grafana cannot run here.

- compose.yaml: parsed with PyYAML, its ``${…}`` interpolated as Docker Compose does, and
  validated against the Compose Specification's JSON schema (``compose-spec.json`` beside this
  file: compose-spec/compose-spec's schema/compose-spec.json at commit 170098ba07d9, Apache-2.0;
  replace it with a newer copy when Compose grows). Then what the schema cannot know: every
  ``depends_on`` names a service (with a healthcheck where it waits for health), every bind-mounted
  file exists in the repository, every CCPROXY_ variable is a ccproxy setting, and the Gateway's
  and the Compressor's environments pass ccproxy's own production start checks.
- The dashboard: every panel's PromQL names only metrics (and labels, and label values where
  the code fixes them) that the services export, collected by creating ccproxy's and BentoML's
  real collectors in a fresh interpreter and reading the /metrics text they produce; and, where
  ``promtool`` is installed (Debian: prometheus), each expression is parsed by promtool as a
  recording rule.
- Grafana's provisioning files point at the mounted dashboard and at the stack's Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema_rs
import pytest
import yaml

from ccproxy.compression.pipeline import Outcome
from ccproxy.http_metrics import BENTOML_ROUTES
from ccproxy.metrics import GatewayMetrics
from ccproxy.settings import Settings
from ccproxy.startup_checks import production_problems

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")
DASHBOARD = REPO / "deploy" / "grafana" / "ccproxy.json"
GRAFANA_DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
GRAFANA_DASHBOARDS = REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "ccproxy.yaml"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager.yml"
DEPLOY_DOC = REPO / "docs" / "DEPLOY.md"

# What the stack is started with in these tests: the secrets compose.yaml requires, nothing else.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-pass",
    "CCPROXY_METRICS_TOKEN": "metrics-token",
    "CCPROXY_COMPRESSOR_TOKEN": "compressor-token",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.invalid/services/T/B/X",
    "GRAFANA_ADMIN_PASSWORD": "grafana-pass",
}
SETTINGS_VARIABLES = {f"CCPROXY_{name.upper()}" for name in Settings.model_fields}
# Series Prometheus makes itself: `up` per target (ALERTS, per pending or firing alert: alert_labels).
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
TARGET_LABELS = {"job", "instance"}


# --- Compose interpolation -------------------------------------------------------------------------


class Unset(Exception):
    """A ``${VAR:?message}`` whose variable is unset or empty: Compose refuses the file."""


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?", re.S)


def interpolate(text: str, env: dict[str, str], used: set[str] | None = None) -> str:
    """Compose's interpolation of one string: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e},
    ${VAR?e}, ${VAR:+a}, ${VAR+a}."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["bare"]:
            name, op, arg = match["bare"], None, ""
        else:
            parts = _BRACED.fullmatch(match["braced"])
            assert parts, f"bad interpolation ${{{match['braced']}}}"
            name, op, arg = parts["name"], parts["op"], parts["arg"] or ""
        if used is not None:
            used.add(name)
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?"):
            if value is None or (op == ":?" and not value):
                raise Unset(f"{name}: {arg}")
            return value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""

    return _VARIABLE.sub(one, text)


def interpolated(node: Any, env: dict[str, str], used: set[str] | None = None) -> Any:
    """Compose interpolates every string value (not the keys) after parsing the YAML."""
    if isinstance(node, dict):
        return {key: interpolated(value, env, used) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(value, env, used) for value in node]
    if isinstance(node, str):
        return interpolate(node, env, used)
    return node


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    return interpolated(raw_compose, SECRETS)


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as a dict; None: passed on from the host only when set there."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) for item in env]
        return {pair[0]: (pair[1] if len(pair) == 2 else None) for pair in pairs}
    return {key: (None if value is None else str(value)) for key, value in env.items()}


@dataclass
class Mount:
    source: str
    target: str
    bind: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            bind = source.startswith((".", "/", "~"))
        else:
            source, target, bind = volume.get("source", ""), volume["target"], volume["type"] == "bind"
        result.append(Mount(source, target, bind))
    return result


def secret_targets(service: dict[str, Any]) -> dict[str, str]:
    """Secret name → the path it has in the container (short syntax: /run/secrets/<name>)."""
    result = {}
    for secret in service.get("secrets", []):
        name = secret if isinstance(secret, str) else secret["source"]
        target = name if isinstance(secret, str) else secret.get("target", name)
        result[name] = target if target.startswith("/") else f"/run/secrets/{target}"
    return result


def healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return re.search(r"https?://[^\s'\"]+", " ".join(test) if isinstance(test, list) else test)[0]


def ccproxy_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run ccproxy itself (any CCPROXY_ setting in their environment)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if any(key.startswith("CCPROXY_") for key in environment(service))
    }


# --- compose.yaml ---------------------------------------------------------------------------------


def test_compose_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = jsonschema_rs.validator_for(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, error.instance_path))}: {error.message}" for error in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_check_would_catch_a_mistake(compose: dict[str, Any]) -> None:
    validator = jsonschema_rs.validator_for(json.loads(COMPOSE_SCHEMA.read_text()))
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["healthcheck"]["tset"] = broken["services"]["gateway"]["healthcheck"].pop("test")
    assert not validator.is_valid(broken)


def test_the_stack_has_every_part(compose: dict[str, Any]) -> None:
    images = {name: service.get("image", "") for name, service in compose["services"].items()}
    assert {"gateway", "compressor", "postgres", "prometheus", "alertmanager", "grafana"} <= set(images)
    assert images["postgres"].split(":")[1].split(".")[0] == "15"
    for name, service in compose["services"].items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image's version ({image})"


def _distribution(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_bento_installs_every_runtime_dependency() -> None:
    """The image installs bentofile.yaml's list, not pyproject.toml: a dependency added to one
    and not the other is an import error at start-up (or, for billing, in the scheduled job)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + [r for extra in ("scorer", "embedded", "gpu", "billing") for r in extras[extra]]
    needed = {_distribution(r) for r in wanted}
    needed -= {"bentoml", "ccproxy"}  # the Bento's base, and the extras' self-references
    bento = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    packaged = {_distribution(r) for r in bento["python"]["packages"]}
    assert needed - packaged == set()
    assert "billing/**/*.py" in bento["include"]


def test_the_ccproxy_image_is_the_containerized_bento(raw_compose: dict[str, Any], compose: dict[str, Any]) -> None:
    """Both ccproxy services run the image `bentoml containerize` makes of this Bento, and the
    file says how to build it."""
    bento = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    services = ccproxy_services(compose)
    assert set(services) == {"gateway", "compressor"}
    images = {service["image"] for service in services.values()}
    assert len(images) == 1
    [image] = images
    repository, tag = image.split(":")
    assert repository == bento["name"]
    header = COMPOSE.read_text()
    assert "make build" in header and f"bentoml containerize {bento['name']}:latest -t {image}" in header
    # The Compressor runs on its own; the Gateway is the image's default (the Bento's service).
    assert services["compressor"]["command"][:3] == ["bentoml", "serve", "service:Compressor"]
    assert "command" not in services["gateway"] and bento["service"] == "service:Gateway"


def test_depends_on_names_services_that_can_satisfy_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        depends = {other: {"condition": "service_started"} for other in depends} if isinstance(depends, list) else depends
        for other, how in depends.items():
            assert other in services, f"{name} depends on {other}, which is no service"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[other], f"{name} waits for {other} to be healthy: it has no healthcheck"
            if how["condition"] == "service_completed_successfully":
                assert services[other].get("restart") == "no", f"{other} is waited for to finish: it must not restart"


def test_long_running_services_have_healthchecks(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"{name} has no healthcheck"


def test_ccproxy_healthchecks_ask_readyz_on_the_served_port(compose: dict[str, Any]) -> None:
    for name, service in ccproxy_services(compose).items():
        url = urlsplit(healthcheck_url(service))
        assert url.path == "/readyz" and url.path in BENTOML_ROUTES, name
        assert url.hostname in ("127.0.0.1", "localhost") and url.port == served_port(service), name
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], f"{name}: the image has python, not curl"
        compile(test[3], f"{name} healthcheck", "exec")


def served_port(service: dict[str, Any]) -> int:
    """The port `bentoml serve` listens on in the container (its --port, else 3000)."""
    command = service.get("command") or []
    return int(command[command.index("--port") + 1]) if "--port" in command else 3000


def test_bind_mounts_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for mount in mounts(service):
            if mount.bind:
                path = (COMPOSE.parent / mount.source).resolve()
                assert path.exists(), f"{name} mounts {mount.source}, which is not in the repository"
                assert REPO in path.parents or path == REPO, f"{name} mounts {mount.source} from outside the repository"
            else:
                assert mount.source in declared, f"{name} uses volume {mount.source}, not declared"


def test_secrets_come_from_the_environment_and_are_declared(compose: dict[str, Any]) -> None:
    declared = compose.get("secrets", {})
    for name, service in compose["services"].items():
        for secret in secret_targets(service):
            assert secret in declared, f"{name} uses secret {secret}, not declared"
    for secret, source in declared.items():
        assert set(source) == {"environment"}, f"secret {secret} must come from an environment variable"
        assert source["environment"] in SECRETS


def test_the_secrets_are_required(raw_compose: dict[str, Any]) -> None:
    """Without its secrets Compose refuses the file: no stack with an open /metrics or Compressor."""
    used: set[str] = set()
    interpolated(raw_compose, SECRETS, used)
    required = set()
    for name in used:
        try:
            interpolated(raw_compose, {k: v for k, v in SECRETS.items() if k != name})
        except Unset:
            required.add(name)
    assert required == {"POSTGRES_PASSWORD", "CCPROXY_METRICS_TOKEN", "CCPROXY_COMPRESSOR_TOKEN"}
    with pytest.raises(Unset):  # set but empty is refused too
        interpolated(raw_compose, SECRETS | {"CCPROXY_METRICS_TOKEN": ""})
    secret_variables = {source["environment"] for source in raw_compose["secrets"].values()}
    assert required | secret_variables == set(SECRETS)


def test_ccproxy_variables_are_settings(raw_compose: dict[str, Any]) -> None:
    """Every CCPROXY_ name, in a service's environment or interpolated from the host, is a field of
    ccproxy.settings.Settings (the others would be ignored silently: extra="ignore")."""
    used: set[str] = set()
    interpolated(raw_compose, SECRETS, used)
    names = {name for service in raw_compose["services"].values() for name in environment(service)}
    ccproxy_names = {name for name in names | used if name.startswith("CCPROXY_")}
    assert ccproxy_names, "no CCPROXY_ setting at all"
    assert ccproxy_names - SETTINGS_VARIABLES == set()


@pytest.fixture
def settings_of(monkeypatch: pytest.MonkeyPatch):
    """Settings as a service of compose.yaml reads them (host variables as in SECRETS)."""

    def read(service: dict[str, Any]) -> Settings:
        for name in list(os.environ):
            if name.startswith("CCPROXY_"):
                monkeypatch.delenv(name)
        for name, value in environment(service).items():
            if value is None:
                value = SECRETS.get(name)
            if value is not None:
                monkeypatch.setenv(name, value)
        return Settings()

    return read


def test_ccproxy_services_pass_the_production_start_checks(compose: dict[str, Any], settings_of) -> None:
    """Both run with CCPROXY_ENVIRONMENT=production, so service.py refuses to start on an open
    /metrics or an unauthenticated Compressor: their settings must pass that check."""
    for name, service in ccproxy_services(compose).items():
        settings = settings_of(service)
        assert settings.environment == "production", name
        assert production_problems(settings) == [], name
        assert settings.metrics_token is not None
        assert settings.metrics_token.get_secret_value() == SECRETS["CCPROXY_METRICS_TOKEN"], name


def test_the_gateway_reaches_the_compressor_and_postgres_by_service_name(compose: dict[str, Any], settings_of) -> None:
    services = compose["services"]
    gateway, compressor = settings_of(services["gateway"]), settings_of(services["compressor"])
    url = urlsplit(gateway.compressor_url)
    assert url.hostname == "compressor" and url.port == served_port(services["compressor"])
    assert gateway.compressor_token.get_secret_value() == compressor.compressor_token.get_secret_value()
    assert compressor.compressor_url is None  # the Compressor serves; it calls nobody
    database = urlsplit(gateway.database_url.get_secret_value())
    postgres = environment(services["postgres"])
    assert database.scheme.startswith("postgres") and database.hostname == "postgres"
    assert (database.username, database.password, database.path) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], "/" + postgres["POSTGRES_DB"])
    # The usage outbox lives on a volume, and /readyz does not wait on the Compressor.
    assert any(mount.target == str(gateway.data_dir) and not mount.bind for mount in mounts(services["gateway"]))
    assert environment(services["gateway"])["BENTOML_CONFIG_OPTIONS"] == "services.ccproxy.runner_probe.enabled=false"


def test_the_compressor_gets_a_gpu_and_a_model_cache(compose: dict[str, Any], settings_of) -> None:
    compressor = compose["services"]["compressor"]
    [device] = compressor["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    # The image's user is bentoml (HOME /home/bentoml): the cache volume must be its ~/.cache.
    cache = next(mount for mount in mounts(compressor) if not mount.bind)
    assert cache.target == "/home/bentoml/.cache"
    assert str(settings_of(compressor).model_cache_dir).startswith(str(Path.home() / ".cache"))


def test_named_volumes_are_handed_to_the_non_root_user(compose: dict[str, Any]) -> None:
    """The image runs as `bentoml`; each ccproxy volume is chowned by the one-shot service first."""
    init = compose["services"]["volume-init"]
    chowned = set(init["entrypoint"][2:])
    assert init["entrypoint"][:2] == ["chown", "bentoml:bentoml"] and init["user"] == "root"
    for name, service in ccproxy_services(compose).items():
        for mount in mounts(service):
            if not mount.bind:
                assert mount.target in chowned, f"{name}: {mount.target} would be owned by root"
                assert any(m.source == mount.source and m.target == mount.target for m in mounts(init))
        assert service["depends_on"]["volume-init"]["condition"] == "service_completed_successfully"


def test_only_the_gateway_is_published_beyond_loopback(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if name != "gateway":
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert "ports" not in compose["services"]["compressor"]  # /score is for the Gateway only


# --- Prometheus and Alertmanager in the stack ----------------------------------------------------


def config_file_of(service: dict[str, Any]) -> tuple[PurePosixPath, Path]:
    """The --config.file a service's command names, and the repository file mounted there."""
    flag = next(arg for arg in service["command"] if arg.startswith("--config.file="))
    in_container = flag.split("=", 1)[1]
    [mount] = [m for m in mounts(service) if m.target == in_container]
    return PurePosixPath(in_container), (COMPOSE.parent / mount.source).resolve()


def prometheus_config_of(compose: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    path = config_file_of(compose["services"]["prometheus"])[1]
    return path, yaml.safe_load(path.read_text())


def test_prometheus_scrapes_both_services_with_the_metrics_token(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    _, config = prometheus_config_of(compose)
    # The rules files are alerts.yml itself, mounted next to the config.
    config_dir = config_file_of(prometheus)[0].parent
    for rules in config["rule_files"]:
        [mount] = [m for m in mounts(prometheus) if m.target == str(config_dir / rules)]
        assert (COMPOSE.parent / mount.source).resolve() == ALERTS
    token_files = set(secret_targets(prometheus).values())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    expected = {"ccproxy-gateway": "gateway", "ccproxy-compressor": "compressor"}
    assert set(jobs) == set(expected)
    # The jobs CcproxyTargetDown watches.
    down = next(rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
                if rule.get("alert") == "CcproxyTargetDown")
    assert set(re.search(r'job=~"([^"]+)"', down["expr"])[1].split("|")) == set(jobs)
    for job_name, service_name in expected.items():
        job = jobs[job_name]
        assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
        assert job["authorization"]["credentials_file"] in token_files
        [static] = job["static_configs"]
        host, port = static["targets"][0].rsplit(":", 1)
        assert host == service_name and int(port) == served_port(services[service_name])
    [alertmanagers] = config["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"][0]["targets"] == ["alertmanager:9093"]
    # The token file holds the services' own CCPROXY_METRICS_TOKEN.
    secret = next(name for name, target in secret_targets(prometheus).items() if target in token_files)
    variable = compose["secrets"][secret]["environment"]
    for service in ccproxy_services(compose).values():
        assert environment(service)["CCPROXY_METRICS_TOKEN"] == SECRETS[variable]


def test_prometheus_config_is_valid(compose: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install -y prometheus)")
    path, config = prometheus_config_of(compose)
    token = tmp_path / "token"
    token.write_text(SECRETS["CCPROXY_METRICS_TOKEN"])
    for job in config["scrape_configs"]:
        job["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    done = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


def test_alertmanager_reads_the_slack_webhook_from_its_secret(compose: dict[str, Any]) -> None:
    service = compose["services"]["alertmanager"]
    assert config_file_of(service)[1] == ALERTMANAGER_CONFIG
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert config["global"]["slack_api_url_file"] in secret_targets(service).values()


# --- Grafana provisioning -------------------------------------------------------------------------


def grafana_mount(compose: dict[str, Any], source: Path) -> str:
    for mount in mounts(compose["services"]["grafana"]):
        if mount.bind and (COMPOSE.parent / mount.source).resolve() == source:
            return mount.target
    raise AssertionError(f"grafana does not mount {source}")


def test_grafana_provisioning_loads_the_dashboard(compose: dict[str, Any]) -> None:
    dashboard_in_container = PurePosixPath(grafana_mount(compose, DASHBOARD))
    assert grafana_mount(compose, GRAFANA_DASHBOARDS.parent) == "/etc/grafana/provisioning/dashboards"
    assert grafana_mount(compose, GRAFANA_DATASOURCES.parent) == "/etc/grafana/provisioning/datasources"
    providers = yaml.safe_load(GRAFANA_DASHBOARDS.read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert PurePosixPath(provider["options"]["path"]) in (dashboard_in_container.parent, dashboard_in_container)
    env = environment(compose["services"]["grafana"])
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == str(dashboard_in_container)
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] in secret_targets(compose["services"]["grafana"]).values()


def test_grafana_datasource_is_the_stacks_prometheus(compose: dict[str, Any]) -> None:
    sources = yaml.safe_load(GRAFANA_DATASOURCES.read_text())
    assert sources["apiVersion"] == 1
    [source] = sources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    url = urlsplit(source["url"])
    assert url.hostname in compose["services"] and compose["services"][url.hostname]["image"].startswith("prom/prometheus:")
    assert url.port == 9090
    # The dashboard's data source variable defaults to it.
    variable = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert variable["current"]["value"] == source["uid"]


# --- the dashboard --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels_of(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels_of(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


GRAFANA_PANEL_TYPES = {"row", "stat", "timeseries", "gauge", "bargauge", "table", "text", "state-timeline",
                       "heatmap", "piechart", "alertlist"}


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "ccproxy" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels_of(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    taken: set[tuple[int, int]] = set()
    for panel in panels_of(dashboard):
        assert panel["type"] in GRAFANA_PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what it shows"
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()


# --- PromQL ---------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
      | (?P<range>\[[^\]]*\])
      | (?P<duration>\d+(?:ms|[smhdwy])(?![A-Za-z0-9_:]))
      | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){},@])""",
    re.X,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                 "topk", "quantile", "limitk", "limit_ratio"}  # may be followed by `by (…)` before `(`
_KEYWORDS = _GROUPING | _AGGREGATIONS | {"bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"}


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Parsed:
    selectors: list[Selector]
    grouping: set[str]


def parse_promql(expr: str) -> Parsed:
    """The metric selectors and grouping labels of an expression (enough of PromQL's grammar for
    that; promtool checks the syntax)."""
    tokens = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        assert match, f"cannot read {expr[position:]!r}"
        position = match.end()
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match[0]))
    selectors, grouping = [], set()
    i = 0

    def matchers_from(start: int) -> tuple[list[tuple[str, str, str]], int]:
        found, j = [], start + 1
        while tokens[j][1] != "}":
            if tokens[j][1] == ",":
                j += 1
                continue
            label, op, value = tokens[j][1], tokens[j + 1][1], tokens[j + 2][1]
            found.append((label, op, json.loads(value) if value.startswith('"') else value[1:-1]))
            j += 3
        return found, j + 1

    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "ident" and text.lower() in _GROUPING:
            i += 1
            if following == "(":
                i += 1
                while tokens[i][1] != ")":
                    if tokens[i][0] == "ident":
                        grouping.add(tokens[i][1])
                    i += 1
                i += 1
            continue
        if kind == "ident" and (text.lower() in _KEYWORDS or following == "("):
            i += 1  # a keyword, a function or an aggregation
            continue
        if kind == "ident":
            selector = Selector(text)
            i += 1
            if following == "{":
                selector.matchers, i = matchers_from(i)
            selectors.append(selector)
            continue
        if text == "{":
            found, i = matchers_from(i)
            names = [value for label, op, value in found if label == "__name__" and op == "="]
            selectors.append(Selector(names[0] if names else "{}", found))
            continue
        i += 1
    return Parsed(selectors, grouping)


_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
# Grafana's built-in variables, as a 1-hour dashboard at a 15 s scrape interval would set them.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600"}


def substituted(expr: str, dashboard: dict[str, Any]) -> str:
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard["templating"]["list"]:
        values[variable["name"]] = str(variable.get("current", {}).get("value", variable.get("query", "")))

    def one(match: re.Match[str]) -> str:
        name = match[1] or match[2] or match[3]
        assert name in values, f"unknown dashboard variable ${name} in {expr}"
        return values[name]

    return _GRAFANA_VARIABLE.sub(one, expr)


class _Labels:
    """Stands in for a prometheus metric: records the label values the code sets."""

    def __init__(self, seen: dict[str, set[str]]) -> None:
        self.seen = seen

    def labels(self, **labels: str) -> _Labels:
        for name, value in labels.items():
            self.seen.setdefault(name, set()).add(value)
        return self

    def inc(self, *_: object) -> None:
        return None

    observe = inc


@lru_cache(maxsize=1)
def label_values_the_code_sets() -> dict[str, frozenset[str]]:
    """Values of the Gateway's labels that its code fixes (not model_family: from settings)."""
    seen: dict[str, set[str]] = {}
    observer = GatewayMetrics(**{f.name: _Labels(seen) for f in fields(GatewayMetrics)})
    for outcome in typing.get_args(Outcome):
        observer.compressed(outcome, 0.1)
    for status in (200, 404, 503):
        observer.finished("family", status, status == 200, 1.0, 10, 5, 5)
        observer.upstream_answered(0.5, status)
    observer.upstream_answered(0.5, None)
    observer.retrieved(1, 1, 1)
    seen.pop("model_family")
    return {label: frozenset(values) for label, values in seen.items()}


@lru_cache(maxsize=1)
def alert_labels() -> frozenset[str]:
    """Labels of Prometheus' ALERTS series: its own and those the rules of alerts.yml set."""
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    return frozenset({"alertname", "alertstate"} | {label for rule in rules for label in rule.get("labels", {})})


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Sample name → label names, as /metrics of the Gateway and the Compressor shows them: ccproxy's
    collectors and BentoML's request metrics (its namespace from the services' own configuration),
    created in a fresh interpreter in BentoML's multiprocess mode, one sample each."""
    home = tmp_path_factory.mktemp("bentoml-home")
    script = """
import json, os, sys, types
sys.path.insert(0, os.getcwd())
import service  # the services' BentoML configuration, and ccproxy's endpoint label bounding
service.Gateway.inject_config()
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.server.http import instruments
from _bentoml_impl.server.app import ServiceAppFactory
import ccproxy.metrics as metrics
metrics.gateway_metrics()
metrics.usage_metrics()
metrics._gpu_gauges()
client = BentoMLContainer.metrics_client.get()
namespace = BentoMLContainer.api_server_config.metrics.namespace.get()
instruments.RunnerTrafficMetricsMiddleware(None, namespace=namespace)._setup()
ServiceAppFactory.adaptive_batch_size_hist.func(types.SimpleNamespace(service=service.Compressor))
from prometheus_client import REGISTRY
for collector in list(REGISTRY._collector_to_names):
    names = getattr(collector, "_labelnames", None)
    if names is None:
        continue
    child = collector.labels(**{name: "x" for name in names}) if names else collector
    if collector._type == "counter":
        child.inc()
    elif collector._type == "gauge":
        child.set(1)
    else:
        child.observe(1)
samples = {}
for family in client.text_string_to_metric_families():
    for sample in family.samples:
        samples.setdefault(sample.name, set()).update(sample.labels)
print(json.dumps({name: sorted(labels) for name, labels in samples.items()}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCPROXY_", "BENTOML_", "PROMETHEUS_"))}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true",
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path_factory.mktemp("multiproc")))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {name: set(labels) for name, labels in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    # Sanity: both kinds are there, under the names the README and the alerts use.
    assert {"tokens_saved_total", "req_latency_seconds_bucket", "gpu_memory_used_bytes",
            "bentoml_service_request_total", "bentoml_service_adaptive_batch_size_bucket"} <= set(samples)
    return samples


def promql_problems(expr: str, exported: dict[str, set[str]], jobs: set[str]) -> list[str]:
    """What in one expression does not exist: metrics, labels, label values the code never sets."""
    known = {name: labels | TARGET_LABELS for name, labels in exported.items()}
    known.update(up=PROMETHEUS_SERIES["up"], ALERTS=alert_labels() | TARGET_LABELS)
    values = label_values_the_code_sets() | {"job": jobs}
    parsed = parse_promql(expr)
    problems = []
    if not parsed.selectors:
        problems.append("no metric")
    labels_here: set[str] = set()
    for selector in parsed.selectors:
        if selector.metric not in known:
            problems.append(f"{selector.metric} is not exported")
            continue
        labels_here |= known[selector.metric]
        for label, op, value in selector.matchers:
            if label not in known[selector.metric]:
                problems.append(f"{selector.metric} has no label {label}")
            elif label in values and op in ("=", "=~"):
                for alternative in value.split("|") if op == "=~" else [value]:
                    literal = re.escape(alternative) == alternative
                    if literal and alternative not in values[label] or not literal and not any(
                            re.fullmatch(alternative, v) for v in values[label]):
                        problems.append(f"{label}={alternative!r} never occurs ({sorted(values[label])})")
    for label in parsed.grouping - labels_here:
        problems.append(f"grouping by {label}, which none of its metrics has")
    return problems


@pytest.fixture(scope="module")
def jobs(compose: dict[str, Any]) -> set[str]:
    return {job["job_name"] for job in prometheus_config_of(compose)[1]["scrape_configs"]}


def test_every_query_names_only_what_the_services_export(dashboard, exported, jobs) -> None:
    problems = []
    for panel, target in queries(dashboard):
        for problem in promql_problems(substituted(target["expr"], dashboard), exported, jobs):
            problems.append(f"{panel['title']} [{target['refId']}]: {problem}")
    assert problems == []


def test_the_query_check_catches_what_does_not_exist(exported, jobs) -> None:
    """The check above is not vacuous: a misspelt metric, a label the metric lacks, an outcome the
    code never sets, a job Prometheus does not have, and a grouping label nothing has all fail."""
    assert promql_problems("sum(rate(tokens_saved_total[5m]))", exported, jobs) == []
    assert promql_problems("sum(rate(token_saved_total[5m]))", exported, jobs) == ["token_saved_total is not exported"]
    assert promql_problems('sum(rate(requests_total{model_family="x"}[5m]))', exported, jobs) == [
        "requests_total has no label model_family"]
    assert promql_problems('rate(compression_latency_seconds_count{outcome=~"compressed|skipped"}[5m])',
                           exported, jobs)[0].startswith("outcome='skipped' never occurs")
    assert promql_problems('up{job="ccproxy"}', exported, jobs)[0].startswith("job='ccproxy' never occurs")
    assert promql_problems("sum by (model) (rate(tokens_in_total[5m]))", exported, jobs) == [
        "grouping by model, which none of its metrics has"]
    assert promql_problems("process_resident_memory_bytes", exported, jobs) == [
        "process_resident_memory_bytes is not exported"]  # multiprocess /metrics has no process_*


def test_the_panels_cover_the_operator_story(dashboard) -> None:
    used: dict[str, set[str]] = {}
    for panel, target in queries(dashboard):
        for selector in parse_promql(substituted(target["expr"], dashboard)).selectors:
            used.setdefault(selector.metric, set()).add(panel["title"])
    assert {
        "tokens_in_total", "tokens_saved_total", "tokens_forwarded_total", "requests_total",
        "req_latency_seconds_bucket", "upstream_latency_seconds_bucket", "compression_latency_seconds_bucket",
        "compression_latency_seconds_count", "compression_fail_open_total", "upstream_errors_total",
        "requests_refused_total", "retrieve_rounds_total", "retrieve_calls_total", "gpu_memory_used_bytes",
        "gpu_memory_total_bytes", "bentoml_service_request_total", "bentoml_service_request_duration_seconds_bucket",
        "bentoml_service_adaptive_batch_size_bucket", "usage_outbox_oldest_age_seconds", "up",
    } <= set(used)
    # p50, p95 and p99 of the end-to-end, upstream and compression histograms.
    for histogram in ("req_latency_seconds_bucket", "upstream_latency_seconds_bucket", "compression_latency_seconds_bucket"):
        exprs = [t["expr"] for _, t in queries(dashboard) if histogram in t["expr"]]
        for quantile in ("0.5", "0.95", "0.99"):
            assert any(e.startswith(f"histogram_quantile({quantile},") for e in exprs), (histogram, quantile)
    # The share saved is saved / in.
    assert any(re.search(r"tokens_saved_total.*\)\s*/\s*sum.*tokens_in_total", t["expr"]) for _, t in queries(dashboard))


def test_every_query_is_valid_promql(dashboard, tmp_path: Path) -> None:
    """promtool parses each expression (Grafana's variables filled in) as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install -y prometheus)")
    rules = [{"record": f"dashboard:panel{panel['id']}_{target['refId'].lower()}",
              "expr": substituted(target["expr"], dashboard)} for panel, target in queries(dashboard)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "ccproxy-dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


# --- docs -----------------------------------------------------------------------------------------


def test_deploy_doc_tells_how_to_run_it(raw_compose: dict[str, Any], dashboard) -> None:
    doc = DEPLOY_DOC.read_text()
    assert "## Compose: everything on one host" in doc and "## Grafana" in doc
    section = doc[doc.index("## Compose: everything on one host"):]
    for variable in SECRETS:
        assert variable in section, f"docs/DEPLOY.md does not say to set {variable}"
    assert "docker compose up" in section
    for panel in panels_of(dashboard):
        if panel["type"] != "row":
            assert panel["title"] in section, f"docs/DEPLOY.md does not describe the panel {panel['title']!r}"
