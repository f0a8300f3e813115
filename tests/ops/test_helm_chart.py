"""The Helm chart (deploy/helm/ccproxy/), rendered and checked with real tools; no cluster and no
helm binary are needed here.

- Helm itself: ``helm-python-sdk`` (import ``helm_python``) binds libhelm_c, a C ABI over Helm's
  official Go SDK (v4). ``Chart.render`` is the engine of ``helm template`` (offline: ``lookup``
  finds nothing), and it enforces values.schema.json as ``helm install`` does; ``lint`` is
  ``helm lint``.
- Kubernetes' own OpenAPI schemas, per version, through ``kubernetes-validate``, in strict mode (an
  unknown field is an error). The Prometheus Operator's ServiceMonitor is a CRD, which those
  schemas do not hold: it is checked against SERVICE_MONITOR_SCHEMA below, a minimal schema of the
  fields the chart uses, written after the operator's CRD (monitoring.coreos.com/v1).
- Then what no schema knows: every CCPROXY_ variable is a ccproxy setting, the pods' settings pass
  ccproxy's production start checks, the Gateway reaches the Compressor's Service, probes, HPAs,
  PDBs, secrets (never in a ConfigMap or a plain env value), pinned images, the security context,
  the billing CronJob, the ServiceMonitors' jobs (those alerts.yml watches).

Three sets of values are rendered: "required" (the defaults plus the three values the chart cannot
do without), "full" (GPU Compressor with its HPA, bundled Redis, billing, ServiceMonitors, the
Gateway as a StatefulSet with a volume per pod, every secret from an existing Secret) and "cpu"
(CPU Compressor, an external Redis, secrets given as values).

Missing tools fail (never skip) with the pip command that installs them.
"""

from __future__ import annotations

import base64
import copy
import importlib
import json
import logging
import os
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import SecretStr

from ccproxy.http_metrics import BENTOML_ROUTES
from ccproxy.settings import Settings
from ccproxy.startup_checks import production_problems
from tests.ops.test_deploy_configs import ALERTS, SETTINGS_VARIABLES, exported  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "ccproxy"
RELEASE = "ccproxy"
NAMESPACE = "llm-proxy"
# The oldest Kubernetes the checks use and a recent one; Chart.yaml's kubeVersion allows both.
KUBERNETES_VERSIONS = ("1.31.0", "1.35.0")
PIP = ".venv/bin/pip install 'helm-python-sdk==0.2.2' 'kubernetes-validate>=1.35,<2'"

# The image's user (BentoML's `bentoml`), home and Bento folder.
BENTO_UID = 1034
BENTO_HOME = "/home/bentoml"
BENTO_SRC = "/home/bentoml/bento/src"
BENTOML_PORT = 3000  # `bentoml serve`'s default, the Gateway's port (the image's default command)

# ccproxy's settings whose values are secrets (SecretStr), as env names, and HF_TOKEN.
SECRET_SETTINGS = {
    f"CCPROXY_{name.upper()}"
    for name, field in Settings.model_fields.items()
    if SecretStr in (getattr(field.annotation, "__args__", None) or (field.annotation,))
}
SECRET_ENV = SECRET_SETTINGS | {"HF_TOKEN"}


def _tool(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:  # a missing tool is a failure, never a skip
        pytest.fail(f"{module} is not installed ({error}); install it with: {PIP}", pytrace=False)


# --- values --------------------------------------------------------------------------------------

REQUIRED = {
    "database": {"url": "postgresql://ccproxy:pg-Secret-9f2c@db.example.internal:5432/ccproxy?sslmode=require"},
    "metricsToken": {"value": "metrics-Secret-5b0e6c1d2a3f4e5d6c7b8a90"},
    "compressorToken": {"value": "compressor-Secret-1a2b3c4d5e6f7a8b9c0d"},
}

# Existing Secrets the "full" set points at (what the cluster would hold; never given to Helm).
EXISTING = {
    "ccproxy-db": {"url": "postgresql://postgres.abc:sb-Secret-77@aws-0.pooler.supabase.com:6543/postgres"},
    "ccproxy-ops": {"metrics": "metrics-Existing-8c7d6e5f", "compressor": "compressor-Existing-4b3a2918",
                    "admin": "admin-Existing-0f1e2d3c4b5a69788796"},
    "ccproxy-upstream": {"openai": "sk-Existing-upstream-1234567890"},
    "ccproxy-hf": {"token": "hf_Existing_abcdefghijklmnop"},
    "ccproxy-stripe": {"api-key": "sk_test_Existing_stripe_0987654321"},
}

FULL = {
    "image": {"repository": "registry.example.com/ccproxy"},
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "database": {"existingSecret": "ccproxy-db", "existingSecretKey": "url"},
    "metricsToken": {"existingSecret": "ccproxy-ops", "existingSecretKey": "metrics"},
    "compressorToken": {"existingSecret": "ccproxy-ops", "existingSecretKey": "compressor"},
    "adminToken": {"existingSecret": "ccproxy-ops", "existingSecretKey": "admin"},
    "upstream": {"existingSecret": "ccproxy-upstream", "existingSecretKey": "openai"},
    "anthropicUpstream": {"url": "https://api.anthropic.com/v1", "apiKey": "sk-ant-Chart-value-5566778899"},
    "huggingFace": {"existingSecret": "ccproxy-hf", "existingSecretKey": "token"},
    "redis": {"enabled": True},
    "gateway": {
        "image": {"tag": "cpu-2vqahwho4obuyax4"},
        "persistence": {"enabled": True, "storageClassName": "fast-ssd", "size": "2Gi"},
        "config": {"CCPROXY_RATE_LIMIT_REQUESTS_PER_MINUTE": "600", "CCPROXY_COMPRESSION_MODE": "lossless"},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}],
    },
    "compressor": {
        "image": {"tag": "gpu-2vqahwho4obuyax4"},
        "gpu": 1,
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        "modelCache": {"existingClaim": "ccproxy-models"},
        "config": {"CCPROXY_COMPRESSOR_MAX_BATCH_SIZE": "8", "CCPROXY_SCORING_MODE": "fusion"},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "billing": {"enabled": True, "existingSecret": "ccproxy-stripe", "existingSecretKey": "api-key",
                "config": {"CCPROXY_BILLING_MODE": "meters"}},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
}

CPU = {
    "upstream": {"apiKey": "sk-Chart-upstream-value-0011223344"},
    "adminToken": {"value": "admin-Chart-value-99887766554433221100"},
    "redis": {"url": "redis://:redis-Secret-pass-42@redis.example.internal:6379/0"},
    "compressor": {"gpu": 0, "image": {"tag": "cpu"}, "replicas": 2,
                   "resources": {"requests": {"cpu": "4", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "6Gi"}}},
    "gateway": {"autoscaling": {"enabled": False}, "replicas": 1},
    "billing": {"enabled": True, "stripeApiKey": "sk_test_Chart_stripe_value_123"},
}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged(result[key], value)
            else:
                result[key] = copy.deepcopy(value)
    return result


VALUE_SETS = {"required": REQUIRED, "full": merged(REQUIRED, FULL), "cpu": merged(REQUIRED, CPU)}
# The "full" set's database/tokens come from existing Secrets: its REQUIRED values are overridden
# by existingSecret (which wins), so their plain values must not reach the manifests either.


def secret_values(values: dict[str, Any]) -> set[str]:
    """The secret strings given as values (they may only go into the chart's Secret)."""
    fields = {"database": "url", "metricsToken": "value", "compressorToken": "value", "upstream": "apiKey",
              "anthropicUpstream": "apiKey", "adminToken": "value", "huggingFace": "token",
              "billing": "stripeApiKey", "redis": "url"}
    return {values[key][field] for key, field in fields.items() if values.get(key, {}).get(field)}


# --- rendering -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> ModuleType:
    module = _tool("helm_python")
    # Helm's own log lines (lint logs each `fail` it tolerates) into Python's logging, warnings up.
    module.enable_logging(logging.WARNING)
    return module


@pytest.fixture(scope="module")
def kubernetes_validate() -> ModuleType:
    return _tool("kubernetes_validate")


@pytest.fixture(scope="module")
def chart(helm: ModuleType) -> Iterator[Any]:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def render(chart: Any):
    """Values-set name or values → {template path: text}, rendered by Helm's engine."""

    @lru_cache(maxsize=None)
    def cached(name: str) -> dict[str, str]:
        return chart.render(VALUE_SETS[name], name=RELEASE, namespace=NAMESPACE)

    def run(values: str | dict[str, Any]) -> dict[str, str]:
        if isinstance(values, str):
            return cached(values)
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)

    return run


@pytest.fixture(scope="module")
def manifests(render) -> dict[str, list[dict[str, Any]]]:
    """Values-set name → the Kubernetes objects rendered (NOTES.txt aside)."""
    result = {}
    for name in VALUE_SETS:
        objects = []
        for path, text in render(name).items():
            if path.endswith("NOTES.txt"):
                continue
            for document in yaml.safe_load_all(text):
                if document:
                    document.setdefault("metadata", {})
                    objects.append(document)
        result[name] = objects
    return result


class Objects:
    """The rendered objects of one values set, with lookups."""

    def __init__(self, objects: list[dict[str, Any]], values: dict[str, Any]) -> None:
        self.all = objects
        self.values = values

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.all if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        [found] = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        return found

    def workload(self, name: str) -> dict[str, Any]:
        [found] = [o for o in self.all if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] == name]
        return found

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.all if o["kind"] in ("Deployment", "StatefulSet", "CronJob")]

    def secret_data(self, name: str) -> dict[str, str]:
        chart_secrets = {s["metadata"]["name"]: s for s in self.of("Secret")}
        if name in chart_secrets:
            return {k: base64.b64decode(v).decode() for k, v in chart_secrets[name].get("data", {}).items()}
        assert name in EXISTING, f"the Secret {name} is neither rendered nor an existing one"
        return EXISTING[name]

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        """A container's environment as Kubernetes builds it: envFrom first, env over it."""
        result: dict[str, str] = {}
        for source in container.get("envFrom", []):
            config_map = self.get("ConfigMap", source["configMapRef"]["name"])
            result.update(config_map["data"])
        for entry in container.get("env", []):
            if "value" in entry:
                result[entry["name"]] = entry["value"]
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                data = self.secret_data(ref["name"])
                assert ref["key"] in data, f"{entry['name']}: the Secret {ref['name']} has no key {ref['key']}"
                result[entry["name"]] = data[ref["key"]]
        return result


@pytest.fixture(scope="module")
def rendered(manifests) -> dict[str, Objects]:
    return {name: Objects(objects, VALUE_SETS[name]) for name, objects in manifests.items()}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return workload["spec"]["template"]["metadata"]["labels"]


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = pod_spec(workload)["containers"]
    return container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


NAMES = {"gateway": f"{RELEASE}-gateway", "compressor": f"{RELEASE}-compressor", "redis": f"{RELEASE}-redis",
         "billing": f"{RELEASE}-billing"}


@pytest.fixture
def settings_of(monkeypatch: pytest.MonkeyPatch):
    """ccproxy's Settings as a container of the chart reads them."""

    def read(objects: Objects, container: dict[str, Any]) -> Settings:
        for name in list(os.environ):
            if name.startswith("CCPROXY_"):
                monkeypatch.delenv(name)
        for name, value in objects.env(container).items():
            monkeypatch.setenv(name, value)
        return Settings()

    return read


# --- Helm: lint, schema, required values ---------------------------------------------------------


def test_chart_metadata() -> None:
    import tomllib

    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "ccproxy" and meta["type"] == "application"
    assert meta["appVersion"] == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for name in ("values.yaml", "values.schema.json", "README.md", "templates/NOTES.txt"):
        assert (CHART / name).is_file(), name
    json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_helm_lint_passes(helm, values_set: str) -> None:
    for version in KUBERNETES_VERSIONS:
        report = helm.lint(str(CHART), VALUE_SETS[values_set], strict=True, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
        assert report["errors"] == [] and problems == [], report


def test_helm_lint_reports_what_is_wrong(helm) -> None:
    """Lint can fail: on a value the schema refuses. (It tolerates the templates' `fail` on a
    missing required value, as `helm lint` does: the chart's defaults lint clean, and rendering
    them fails, test_required_values.)"""
    report = helm.lint(str(CHART), None, strict=True, kube_version="v1.31.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report
    report = helm.lint(str(CHART), merged(REQUIRED, {"gateway": {"replicas": -1}}), strict=True, kube_version="v1.31.0")
    assert any("/gateway/replicas" in error for error in report["errors"]), report


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_helm_install_dry_run_renders_the_same(helm, chart, manifests, values_set: str) -> None:
    """`helm install --dry-run=client` (Helm's install action, no cluster contacted): it also checks
    Chart.yaml's kubeVersion against Helm's default capabilities and sorts the manifests; what it
    would apply are the objects the tests below check."""
    with helm.Config(storage_driver="memory", namespace=NAMESPACE, kube_apiserver="https://127.0.0.1:1") as config:
        release = config.install(chart, RELEASE, VALUE_SETS[values_set], dry_run="client", namespace=NAMESPACE)
    installed = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(installed, key=key) == sorted(manifests[values_set], key=key)
    assert release["notes"].startswith(f"ccproxy {release['app_version']} is installed as release {RELEASE}")


@pytest.mark.parametrize(
    ("missing", "named"),
    [("database", "database"), ("metricsToken", "metricsToken"), ("compressorToken", "compressorToken")],
)
def test_required_values(helm, render, missing: str, named: str) -> None:
    values = {key: value for key, value in REQUIRED.items() if key != missing}
    with pytest.raises(helm.HelmError, match=named):
        render(values)
    # An existing Secret is enough.
    render(values | {missing: {"existingSecret": "mine", "existingSecretKey": "key"}})


def test_billing_needs_a_stripe_key(helm, render) -> None:
    with pytest.raises(helm.HelmError, match="billing"):
        render(merged(REQUIRED, {"billing": {"enabled": True}}))


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"gateway": {"replicas": -1}}, "/gateway/replicas"),
        ({"compressor": {"replicas": -2}}, "/compressor/replicas"),
        ({"compressor": {"gpu": -1}}, "/compressor/gpu"),
        ({"gateway": {"autoscaling": {"minReplicas": 0}}}, "/gateway/autoscaling"),
        ({"gateway": {"replicaCount": 3}}, "/gateway"),  # a typo: unknown keys are refused
        ({"gateway": {"image": {"tag": "latest"}}}, "/gateway/image/tag"),
        ({"compressor": {"image": {"tag": ""}}}, "/compressor/image/tag"),
        ({"redis": {"image": {"tag": "latest"}}}, "/redis/image/tag"),
        # Secrets, and what the chart sets itself, are refused in the ConfigMaps' settings.
        ({"gateway": {"config": {"CCPROXY_DATABASE_URL": "postgresql://x"}}}, "'CCPROXY_DATABASE_URL'"),
        ({"compressor": {"config": {"CCPROXY_COMPRESSOR_TOKEN": "t"}}}, "'CCPROXY_COMPRESSOR_TOKEN'"),
        ({"billing": {"config": {"CCPROXY_STRIPE_API_KEY": "sk_x"}}}, "'CCPROXY_STRIPE_API_KEY'"),
        ({"gateway": {"config": {"CCPROXY_COMPRESSOR_URL": "http://elsewhere:3000"}}}, "'CCPROXY_COMPRESSOR_URL'"),
        ({"gateway": {"config": {"CCPROXY_GATEWAY_WORKERS": 2}}}, "/gateway/config"),  # not a string
        ({"gateway": {"config": {"OTHER": "x"}}}, "'OTHER'"),
        ({"compressor": {"autoscaling": {"inFlightMetric": {"targetAverageValue": "lots"}}}}, "/compressor/autoscaling"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext"),
        ({"redis": {"url": "http://redis:6379"}}, "/redis/url"),
    ],
)
def test_values_schema_refuses_bad_values_at_render_time(helm, render, bad: dict[str, Any], where: str) -> None:
    """Helm checks values.schema.json before rendering; the message names the value (the property
    path, or for a refused key its name)."""
    with pytest.raises(helm.HelmValuesError) as refused:
        render(merged(REQUIRED, bad))
    assert where in str(refused.value), str(refused.value)


def test_values_schema_keeps_every_secret_setting_out_of_the_config_maps() -> None:
    """The schema's list of names refused in gateway/compressor/billing.config covers every secret
    setting ccproxy has (a new SecretStr field must be added there) and HF_TOKEN needs no entry
    (only CCPROXY_ names are allowed at all)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    settings = schema["definitions"]["settings"]
    refused = set(settings["propertyNames"]["not"]["enum"])
    assert SECRET_SETTINGS, "no secret settings found: the SecretStr detection broke"
    assert SECRET_SETTINGS <= refused
    assert refused <= SETTINGS_VARIABLES
    assert not re.fullmatch(settings["propertyNames"]["pattern"], "HF_TOKEN")
    for component in ("gateway", "compressor", "billing"):
        assert schema["properties"][component]["properties"]["config"] == {"$ref": "#/definitions/settings"}


# --- Kubernetes schemas --------------------------------------------------------------------------

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"],
                     "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                                    "labels": STRING_MAP, "annotations": STRING_MAP}},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": STRING_MAP, "matchExpressions": {"type": "array"}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {"type": "object", "additionalProperties": False, "required": ["key"],
                                                    "properties": {"name": {"type": "string"}, "key": {"type": "string"},
                                                                   "optional": {"type": "boolean"}}},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}


def schema_errors(kubernetes_validate: ModuleType, obj: dict[str, Any], version: str) -> list[str]:
    """Strict validation against Kubernetes' schema of that version (CRDs: CRD_SCHEMAS)."""
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        import jsonschema  # a dependency of kubernetes-validate

        validator = jsonschema.Draft202012Validator(crd)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:  # a kind with no schema is an error too
        return [error.message]
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_every_object_matches_its_schema(kubernetes_validate, rendered, values_set: str, version: str) -> None:
    objects = rendered[values_set].all
    assert objects
    errors = {f"{o['kind']}/{o['metadata']['name']}": schema_errors(kubernetes_validate, o, version) for o in objects}
    assert {name: found for name, found in errors.items() if found} == {}


def test_the_schema_checks_would_catch_a_mistake(kubernetes_validate, rendered) -> None:
    objects = rendered["full"]
    gateway = copy.deepcopy(objects.workload(NAMES["gateway"]))
    only_container(gateway)["readinesProbe"] = only_container(gateway).pop("readinessProbe")
    assert schema_errors(kubernetes_validate, gateway, KUBERNETES_VERSIONS[0])
    hpa = copy.deepcopy(objects.get("HorizontalPodAutoscaler", NAMES["compressor"]))
    hpa["spec"]["metrics"][0]["pods"]["target"]["type"] = "Percent"
    hpa["spec"]["metrics"][0]["pods"]["metric"]["nmae"] = "x"
    assert schema_errors(kubernetes_validate, hpa, KUBERNETES_VERSIONS[0])
    monitor = copy.deepcopy(objects.of("ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["bearerTokenScret"] = {"name": "x", "key": "y"}
    assert schema_errors(kubernetes_validate, monitor, KUBERNETES_VERSIONS[0])
    assert schema_errors(kubernetes_validate, {"apiVersion": "example.com/v1", "kind": "Unknown",
                                               "metadata": {"name": "x"}}, KUBERNETES_VERSIONS[0])


# --- what each set renders -----------------------------------------------------------------------


def kinds(objects: Objects) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for o in objects.all:
        result.setdefault(o["kind"], set()).add(o["metadata"]["name"])
    return result


def test_what_each_values_set_renders(rendered) -> None:
    g, c = NAMES["gateway"], NAMES["compressor"]
    assert kinds(rendered["required"]) == {
        "ServiceAccount": {RELEASE}, "Secret": {RELEASE}, "ConfigMap": {g},
        "Deployment": {g, c}, "Service": {g, c}, "HorizontalPodAutoscaler": {g}, "PodDisruptionBudget": {g},
    }
    assert kinds(rendered["full"]) == {
        "ServiceAccount": {RELEASE}, "Secret": {RELEASE}, "ConfigMap": {g, c, NAMES["billing"]},
        "StatefulSet": {g}, "Deployment": {c, NAMES["redis"]},
        "Service": {g, f"{g}-headless", c, NAMES["redis"]}, "NetworkPolicy": {NAMES["redis"]},
        "HorizontalPodAutoscaler": {g, c}, "PodDisruptionBudget": {g, c},
        "CronJob": {NAMES["billing"]}, "ServiceMonitor": {g, c},
    }
    assert kinds(rendered["cpu"]) == {
        "ServiceAccount": {RELEASE}, "Secret": {RELEASE}, "ConfigMap": {g},
        "Deployment": {g, c}, "Service": {g, c}, "PodDisruptionBudget": {c}, "CronJob": {NAMES["billing"]},
    }


def test_services_select_their_own_pods(rendered) -> None:
    for name, objects in rendered.items():
        for service in objects.of("Service"):
            selected = [w for w in objects.workloads() if selects(service["spec"]["selector"], pod_labels(w))]
            assert len(selected) == 1, f"{name}: {service['metadata']['name']} selects {len(selected)} workloads"
            [workload] = selected
            ports = {p["name"]: p["containerPort"] for c in pod_spec(workload)["containers"] for p in c["ports"]}
            for port in service["spec"]["ports"]:
                target = port["targetPort"]
                assert target in ports or target in ports.values(), f"{name}: {service['metadata']['name']}:{target}"


# --- ccproxy's settings --------------------------------------------------------------------------


def ccproxy_containers(objects: Objects) -> dict[str, dict[str, Any]]:
    """Workload name → its container, for the workloads that run ccproxy (CCPROXY_ in their env)."""
    result = {}
    for workload in objects.workloads():
        container = only_container(workload)
        names = {e["name"] for e in container.get("env", [])} | set(objects.env(container))
        if any(name.startswith("CCPROXY_") for name in names):
            result[workload["metadata"]["name"]] = container
    return result


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_ccproxy_variables_are_settings(rendered, values_set: str) -> None:
    """Every CCPROXY_ name the pods get (env, and the ConfigMaps they read) is a field of
    ccproxy.settings.Settings: the others would be ignored silently (extra="ignore")."""
    objects = rendered[values_set]
    names = set()
    for container in ccproxy_containers(objects).values():
        names |= {name for name in objects.env(container) if name.startswith("CCPROXY_")}
    for config_map in objects.of("ConfigMap"):
        names |= set(config_map["data"])
    assert {"CCPROXY_ENVIRONMENT", "CCPROXY_METRICS_TOKEN", "CCPROXY_COMPRESSOR_URL"} <= names
    assert names - SETTINGS_VARIABLES == set()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for component in ("gateway", "compressor", "billing"):
        assert set(defaults[component]["config"]) - SETTINGS_VARIABLES == set()


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_ccproxy_pods_pass_the_production_start_checks(rendered, settings_of, values_set: str) -> None:
    objects = rendered[values_set]
    containers = ccproxy_containers(objects)
    assert {NAMES["gateway"], NAMES["compressor"]} <= set(containers)
    # The two services run the check (service.py); the billing job serves nothing.
    for name in (NAMES["gateway"], NAMES["compressor"]):
        settings = settings_of(objects, containers[name])
        assert settings.environment == "production", name
        assert production_problems(settings) == [], name
    gateway = settings_of(objects, containers[NAMES["gateway"]])
    compressor = settings_of(objects, containers[NAMES["compressor"]])
    assert gateway.metrics_token.get_secret_value() == compressor.metrics_token.get_secret_value()
    assert gateway.compressor_token.get_secret_value() == compressor.compressor_token.get_secret_value()
    assert gateway.database_url is not None and gateway.database_url.get_secret_value().startswith("postgresql://")
    assert compressor.compressor_url is None  # the Compressor serves; it calls nobody
    assert compressor.database_url is None  # and needs no database


def test_the_gateway_reaches_the_compressor_service(rendered, settings_of) -> None:
    for name, objects in rendered.items():
        gateway_container = only_container(objects.workload(NAMES["gateway"]))
        url = urlsplit(settings_of(objects, gateway_container).compressor_url)
        assert url.scheme == "http" and url.hostname == NAMES["compressor"], name
        service = objects.get("Service", url.hostname)
        [port] = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        compressor = objects.workload(NAMES["compressor"])
        assert selects(service["spec"]["selector"], pod_labels(compressor))
        container = only_container(compressor)
        [container_port] = [p for p in container["ports"] if p["name"] == port["targetPort"]]
        args = container["args"]
        assert args[:3] == ["bentoml", "serve", "service:Compressor"], name
        assert int(args[args.index("--port") + 1]) == container_port["containerPort"], name
        assert args[args.index("--working-dir") + 1] == BENTO_SRC
        assert "command" not in container  # the image's entrypoint activates the Bento's environment
        # The Gateway runs the image's default command: the Bento's service, on BentoML's port.
        assert "command" not in gateway_container and "args" not in gateway_container
        assert [p["containerPort"] for p in gateway_container["ports"]] == [BENTOML_PORT]
        # /readyz does not wait on the remote Compressor (docs/DEPLOY.md, "Readiness").
        env = objects.env(gateway_container)
        assert env["BENTOML_CONFIG_OPTIONS"] == "services.ccproxy.runner_probe.enabled=false"
        assert env["CCPROXY_COMPRESSOR_GPUS"] == "0"


def test_the_runner_probe_option_is_the_one_fly_toml_uses() -> None:
    import tomllib

    fly = tomllib.loads((REPO / "deploy" / "fly.toml").read_text())
    assert fly["env"]["BENTOML_CONFIG_OPTIONS"] == "services.ccproxy.runner_probe.enabled=false"


def test_the_compressor_gets_its_gpus(rendered, settings_of) -> None:
    full = rendered["full"]
    container = only_container(full.workload(NAMES["compressor"]))
    gpus = settings_of(full, container).compressor_gpus
    assert gpus == FULL["compressor"]["gpu"] == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert pod_spec(full.workload(NAMES["compressor"]))["tolerations"] == FULL["compressor"]["tolerations"]
    cpu = rendered["cpu"]
    container = only_container(cpu.workload(NAMES["compressor"]))
    assert settings_of(cpu, container).compressor_gpus == 0
    assert not any("nvidia.com/gpu" in (container["resources"].get(part) or {}) for part in ("requests", "limits"))
    assert container["image"].endswith(":cpu")
    # The model cache: the user's PVC, else an emptyDir, at the image user's ~/.cache.
    for name, claim in (("full", "ccproxy-models"), ("cpu", None)):
        pod = pod_spec(rendered[name].workload(NAMES["compressor"]))
        [mount] = [m for m in only_container(rendered[name].workload(NAMES["compressor"]))["volumeMounts"]
                   if m["mountPath"] == f"{BENTO_HOME}/.cache"]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert (volume.get("persistentVolumeClaim") or {}).get("claimName") == claim
        assert claim or "emptyDir" in volume


# --- probes, autoscaling, disruption budgets -----------------------------------------------------


def probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    [found] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_ccproxy_probes_ask_readyz_and_livez(rendered, values_set: str) -> None:
    objects = rendered[values_set]
    for component in ("gateway", "compressor"):
        container = only_container(objects.workload(NAMES[component]))
        expected = {"readinessProbe": "/readyz", "livenessProbe": "/livez", "startupProbe": "/livez"}
        for probe, path in expected.items():
            assert container[probe]["httpGet"]["path"] == path and path in BENTOML_ROUTES, (component, probe)
            assert probe_port(container, container[probe]) == BENTOML_PORT, (component, probe)
        # Slow model loads are the startup probe's business, not the liveness probe's.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= (900 if component == "compressor" else 120)


def test_the_hpas_scale_the_right_workloads_on_the_right_metrics(rendered, exported) -> None:
    for name, objects in rendered.items():
        for hpa in objects.of("HorizontalPodAutoscaler"):
            ref = hpa["spec"]["scaleTargetRef"]
            target = objects.workload(ref["name"])
            assert (ref["apiVersion"], ref["kind"]) == (target["apiVersion"], target["kind"]), name
            assert "replicas" not in target["spec"], f"{name}: the HPA owns {ref['name']}'s replica count"
            assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
            resources = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
            assert [r["name"] for r in resources] == ["cpu"] and resources[0]["target"]["type"] == "Utilization"
            # CPU utilisation is measured against the request.
            assert only_container(target)["resources"]["requests"]["cpu"]
        scaled = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in objects.of("HorizontalPodAutoscaler")}
        for workload in objects.workloads():
            if workload["kind"] != "CronJob" and workload["metadata"]["name"] not in scaled:
                assert "replicas" in workload["spec"], f"{name}: {workload['metadata']['name']}"
    full = rendered["full"]
    gateway = full.get("HorizontalPodAutoscaler", NAMES["gateway"])
    assert gateway["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"  # persistence on
    assert [m["type"] for m in gateway["spec"]["metrics"]] == ["Resource"]
    compressor = full.get("HorizontalPodAutoscaler", NAMES["compressor"])
    assert compressor["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAMES["compressor"]}
    assert (compressor["spec"]["minReplicas"], compressor["spec"]["maxReplicas"]) == (2, 6)
    [pods] = [m["pods"] for m in compressor["spec"]["metrics"] if m["type"] == "Pods"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["compressor"]["autoscaling"]["inFlightMetric"]
    assert pods["metric"]["name"] == defaults["name"] == "bentoml_service_request_in_progress"
    assert pods["target"] == {"type": "AverageValue", "averageValue": defaults["targetAverageValue"]}
    # The gauge exists under that name in what the Compressor's /metrics shows (BentoML's in-progress
    # requests per endpoint), so prometheus-adapter can serve it as a per-pod metric.
    assert pods["metric"]["name"] in exported and "endpoint" in exported[pods["metric"]["name"]]
    assert [m["type"] for m in compressor["spec"]["metrics"]] == ["Pods", "Resource"]  # CPU as the fallback


def test_the_in_flight_metric_name_is_a_value(render) -> None:
    values = merged(VALUE_SETS["full"], {"compressor": {"autoscaling": {"inFlightMetric": {
        "name": "ccproxy_compressor_queue", "targetAverageValue": "500m"}}}})
    [text] = [t for p, t in render(values).items() if p.endswith("/hpa.yaml")]
    compressor = [d for d in yaml.safe_load_all(text) if d and d["metadata"]["name"] == NAMES["compressor"]][0]
    [pods] = [m["pods"] for m in compressor["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == {"metric": {"name": "ccproxy_compressor_queue"}, "target": {"type": "AverageValue", "averageValue": "500m"}}


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_disruption_budgets_where_more_than_one_pod_runs(rendered, values_set: str) -> None:
    objects = rendered[values_set]
    values = objects.values
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for component in ("gateway", "compressor"):
        settings = merged(defaults[component], values.get(component, {}))
        autoscaling = settings["autoscaling"]
        pods = autoscaling["minReplicas"] if autoscaling["enabled"] else settings["replicas"]
        budgets = [p for p in objects.of("PodDisruptionBudget")
                   if selects(p["spec"]["selector"]["matchLabels"], pod_labels(objects.workload(NAMES[component])))]
        if pods > 1:
            assert [b["spec"]["minAvailable"] for b in budgets] == [1], component
        else:
            assert budgets == [], f"{component}: a budget on a single pod blocks node drains"


# --- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_secrets_only_in_secrets(rendered, render, values_set: str) -> None:
    """No secret value (given as a value, or held by an existing Secret) appears anywhere but in the
    chart's Secret: not in a ConfigMap, not in a plain env value, not in an annotation."""
    objects = rendered[values_set]
    given = secret_values(objects.values)
    assert given
    # REQUIRED's plain values under existingSecret in "full" are not written anywhere at all.
    overridden = {v for k, v in ((k, REQUIRED[k][f]) for k, f in (("database", "url"), ("metricsToken", "value"),
                                                                   ("compressorToken", "value")))
                  if objects.values[k].get("existingSecret")}
    existing = {value for data in EXISTING.values() for value in data.values()}
    for obj in objects.all:
        text = json.dumps(obj)
        for secret in existing | overridden:
            assert secret not in text, f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] != "Secret":
            for secret in given:
                assert secret not in text, f"a secret value in {obj['kind']}/{obj['metadata']['name']}"
    for path, text in render(values_set).items():
        if path.endswith("NOTES.txt"):
            assert not any(secret in text for secret in given | existing)
    # The chart's Secret holds exactly the secrets given as values (existingSecret wins).
    chart_secret = objects.secret_data(RELEASE)
    assert set(chart_secret.values()) - {f"redis://{NAMES['redis']}:6379/0"} == given - overridden


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_secret_settings_come_from_secret_refs(rendered, values_set: str) -> None:
    objects = rendered[values_set]
    for workload in objects.workloads():
        for container in pod_spec(workload)["containers"]:
            for entry in container.get("env", []):
                if entry["name"] in SECRET_ENV:
                    assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry["name"]
            for source in container.get("envFrom", []):
                assert set(source) == {"configMapRef"}
                data = objects.get("ConfigMap", source["configMapRef"]["name"])["data"]
                assert set(data) & SECRET_ENV == set()
    existing_refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                     for w in objects.workloads() for c in pod_spec(w)["containers"] for e in c.get("env", [])
                     if "valueFrom" in e and e["valueFrom"]["secretKeyRef"]["name"] != RELEASE}
    expected = {(v["existingSecret"], v["existingSecretKey"]) for v in objects.values.values()
                if isinstance(v, dict) and v.get("existingSecret")}
    assert existing_refs == expected


def test_the_chart_secret_changes_roll_the_pods(render) -> None:
    """A new secret value changes the pods' checksum annotation, so they restart and read it."""

    def checksum(values: dict[str, Any]) -> str:
        [text] = [t for p, t in render(values).items() if p.endswith("/gateway.yaml")]
        workload = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment")
        return workload["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]

    assert checksum(REQUIRED) != checksum(merged(REQUIRED, {"metricsToken": {"value": "another-token-value-1234"}}))


# --- images, security, volumes -------------------------------------------------------------------


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_images_are_pinned(rendered, values_set: str) -> None:
    objects = rendered[values_set]
    images = set()
    for workload in objects.workloads():
        spec = pod_spec(workload)
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            images.add(image)
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and tag and tag != "latest", image
    repository = merged({"image": {"repository": "ccproxy"}}, objects.values)["image"]["repository"]
    assert {image.rpartition(":")[0] for image in images} - {"redis"} == {repository}
    if objects.values.get("redis", {}).get("enabled"):
        assert "redis:7.0" in images


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_pods_run_as_non_root_with_a_read_only_root(rendered, values_set: str) -> None:
    objects = rendered[values_set]
    for workload in objects.workloads():
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        if name != NAMES["redis"]:
            assert spec["securityContext"]["runAsUser"] == BENTO_UID, name
            assert spec["serviceAccountName"] == RELEASE
        # ccproxy reads CCPROXY_* from its environment: no Service links (CCPROXY_COMPRESSOR_PORT, …).
        assert spec["enableServiceLinks"] is False, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert set(container["resources"]) == {"requests", "limits"}, name
            assert container["resources"]["limits"]["memory"], name
    assert objects.get("ServiceAccount", RELEASE)["automountServiceAccountToken"] is False


def mounted_paths(objects: Objects, workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mount path → its volume (for a StatefulSet's claim templates: the claim template)."""
    spec = pod_spec(workload)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"name": claim["metadata"]["name"], "claimTemplate": claim}
    return {m["mountPath"]: volumes[m["name"]] for m in only_container(workload)["volumeMounts"]}


@pytest.mark.parametrize("values_set", sorted(VALUE_SETS))
def test_ccproxy_writes_only_to_volumes(rendered, settings_of, values_set: str) -> None:
    """With the root filesystem read-only, each place ccproxy and BentoML write is a volume: /tmp,
    BENTOML_HOME (its Prometheus multiprocess files), ~/.cache (models, tokenizers), the outbox."""
    objects = rendered[values_set]
    for name, container in ccproxy_containers(objects).items():
        workload = next(w for w in objects.workloads() if w["metadata"]["name"] == name)
        mounts = mounted_paths(objects, workload)
        env = objects.env(container)
        writable = ["/tmp", env["BENTOML_HOME"]]
        if name != NAMES["billing"]:
            writable += [f"{BENTO_HOME}/.cache", env["TRITON_CACHE_DIR"]]
        if name == NAMES["gateway"]:
            writable.append(str(settings_of(objects, container).data_dir))
        for path in writable:
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), f"{name}: {path}"
    # ccproxy's model cache defaults to ~/.cache/ccproxy/models: under the mounted ~/.cache.
    assert str(Settings.model_fields["model_cache_dir"].default).startswith(str(Path.home() / ".cache"))


def test_the_usage_outbox_volume(rendered, settings_of) -> None:
    """emptyDir by default (lost with the pod); a claim per pod of a StatefulSet with persistence."""
    required = rendered["required"]
    gateway = required.workload(NAMES["gateway"])
    data_dir = str(settings_of(required, only_container(gateway)).data_dir)
    assert gateway["kind"] == "Deployment" and "emptyDir" in mounted_paths(required, gateway)[data_dir]
    full = rendered["full"]
    gateway = full.workload(NAMES["gateway"])
    assert gateway["kind"] == "StatefulSet"
    claim = mounted_paths(full, gateway)[data_dir]["claimTemplate"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert gateway["spec"]["serviceName"] in kinds(full)["Service"]
    assert full.get("Service", gateway["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_the_gateway_gets_time_to_flush_usage(rendered) -> None:
    """SIGTERM → in-flight requests finish and buffered usage is flushed (ccproxy/service.py's
    shutdown hook waits up to its timeout): the grace period covers the preStop sleep, that flush
    and a margin for in-flight requests."""
    source = (REPO / "ccproxy" / "service.py").read_text()
    flush_s = int(re.search(r"self\.flusher\.stop,\s*(\d+)", source)[1])
    for name, objects in rendered.items():
        gateway = objects.workload(NAMES["gateway"])
        pre_stop = only_container(gateway)["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        grace = pod_spec(gateway)["terminationGracePeriodSeconds"]
        assert grace >= int(pre_stop[1]) + flush_s + 20, name


# --- billing, Redis, monitoring ------------------------------------------------------------------


def test_the_billing_cronjob(rendered, settings_of) -> None:
    for name in ("full", "cpu"):
        objects = rendered[name]
        job = objects.get("CronJob", NAMES["billing"])
        assert job["spec"]["schedule"] == "7 * * * *" and job["spec"]["concurrencyPolicy"] == "Forbid"
        assert job["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
        spec = pod_spec(job)
        assert spec["restartPolicy"] == "Never"
        container = only_container(job)
        assert container["args"] == ["python", "-m", "billing", "run"] and "command" not in container
        # The Bento's code is in src/ (not installed as a package): `python -m billing` runs there.
        assert container["workingDir"] == BENTO_SRC
        assert container["image"] == only_container(objects.workload(NAMES["gateway"]))["image"]
        settings = settings_of(objects, container)
        assert settings.stripe_api_key is not None and settings.database_url is not None
        gateway = settings_of(objects, only_container(objects.workload(NAMES["gateway"])))
        assert settings.database_url.get_secret_value() == gateway.database_url.get_secret_value()
    assert settings_of(rendered["full"], only_container(rendered["full"].get("CronJob", NAMES["billing"]))).billing_mode == "meters"
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert "billing/**/*.py" in bentofile["include"]
    assert "CronJob" not in kinds(rendered["required"])


def test_redis(rendered, settings_of, render) -> None:
    # Bundled: one pod, pinned image, nothing persisted, reachable from the Gateway pods only.
    full = rendered["full"]
    redis = full.workload(NAMES["redis"])
    container = only_container(redis)
    assert container["image"] == "redis:7.0" and redis["spec"]["replicas"] == 1
    args = container["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    url = urlsplit(settings_of(full, only_container(full.workload(NAMES["gateway"]))).redis_url.get_secret_value())
    service = full.get("Service", url.hostname)
    assert selects(service["spec"]["selector"], pod_labels(redis)) and url.port == service["spec"]["ports"][0]["port"]
    policy = full.get("NetworkPolicy", NAMES["redis"])
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(redis))
    [rule] = policy["spec"]["ingress"]
    [peer] = rule["from"]
    assert selects(peer["podSelector"]["matchLabels"], pod_labels(full.workload(NAMES["gateway"])))
    assert not selects(peer["podSelector"]["matchLabels"], pod_labels(full.workload(NAMES["compressor"])))
    # External: the URL (it may hold a password) through the chart's Secret; or an existing Secret.
    cpu = rendered["cpu"]
    gateway = settings_of(cpu, only_container(cpu.workload(NAMES["gateway"])))
    assert gateway.redis_url.get_secret_value() == CPU["redis"]["url"]
    assert NAMES["redis"] not in kinds(cpu).get("Deployment", set())
    values = merged(REQUIRED, {"redis": {"existingSecret": "my-redis", "existingSecretKey": "url", "enabled": True}})
    [text] = [t for p, t in render(values).items() if p.endswith("/gateway.yaml")]
    gateway = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment")
    [entry] = [e for e in only_container(gateway)["env"] if e["name"] == "CCPROXY_REDIS_URL"]
    assert entry["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "url"}
    # None configured: no CCPROXY_REDIS_URL at all.
    assert "CCPROXY_REDIS_URL" not in rendered["required"].env(only_container(rendered["required"].workload(NAMES["gateway"])))


def alert_jobs() -> set[str]:
    down = next(rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
                if rule.get("alert") == "CcproxyTargetDown")
    return set(re.search(r'job=~"([^"]+)"', down["expr"])[1].split("|"))


def test_service_monitors_scrape_both_with_the_metrics_token(rendered, settings_of) -> None:
    full = rendered["full"]
    monitors = full.of("ServiceMonitor")
    jobs = set()
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        spec = monitor["spec"]
        services = [s for s in full.of("Service") if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(services) == 1, f"{monitor['metadata']['name']} selects {len(services)} Services (one target each)"
        [service] = services
        assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
        jobs.add(service["metadata"]["labels"][spec["jobLabel"]])
        [endpoint] = spec["endpoints"]
        assert endpoint["path"] == "/metrics" and endpoint["path"] in BENTOML_ROUTES
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["authorization"]["type"] == "Bearer"
        credentials = endpoint["authorization"]["credentials"]
        token = full.secret_data(credentials["name"])[credentials["key"]]
        workload = next(w for w in full.workloads() if selects(service["spec"]["selector"], pod_labels(w)))
        assert settings_of(full, only_container(workload)).metrics_token.get_secret_value() == token
    # The jobs alerts.yml's CcproxyTargetDown (and the Grafana dashboard) expect.
    assert jobs == alert_jobs() == {"ccproxy-gateway", "ccproxy-compressor"}
    assert "ServiceMonitor" not in kinds(rendered["required"])


# --- notes and documentation ---------------------------------------------------------------------


def test_notes_and_readme(render) -> None:
    [notes] = [t for p, t in render("full").items() if p.endswith("NOTES.txt")]
    assert f"svc/{NAMES['gateway']}" in notes and "statefulset/" in notes
    assert "custom metrics" in notes and "bentoml_service_request_in_progress" in notes
    [notes] = [t for p, t in render("required").items() if p.endswith("NOTES.txt")]
    assert "deployment/" in notes and "emptyDir" in notes and "No Redis" in notes
    readme = (CHART / "README.md").read_text()
    for needed in ("prometheus-adapter", "emptyDir", "StatefulSet", "terminationGracePeriodSeconds",
                   "bentoml_service_request_in_progress", "existingSecret", "redis.enabled",
                   "tests/ops/test_helm_chart.py"):
        assert needed in readme, needed
