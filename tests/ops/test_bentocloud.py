"""deploy/bentocloud/deployment.yaml read with BentoML's own deployment schema (the one
`bentoml deploy -f` sends), and checked against the Bento: its service names, ccproxy's
settings. BentoCloud itself cannot be reached from here."""

from __future__ import annotations

from pathlib import Path

import yaml

from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
from bentoml._internal.cloud.schemas.utils import schema_from_object
from ccproxy.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "bentocloud" / "deployment.yaml"


def _services() -> set[str]:
    """The BentoML service names declared in ccproxy/service.py."""
    import re

    return set(re.findall(r'@bentoml\.service\(name="([^"]+)"', (REPO / "ccproxy" / "service.py").read_text()))


def test_the_deployment_parses_with_bentomls_schema() -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    deployment = schema_from_object(raw, CreateDeploymentSchema)
    assert deployment.bento == "ccproxy:latest" and deployment.name == "ccproxy"
    assert set(deployment.services) <= _services() and {"ccproxy", "ccproxy-compressor"} <= set(deployment.services)
    for name, service in deployment.services.items():
        scaling = service.scaling
        assert scaling is not None and 1 <= scaling.min_replicas <= scaling.max_replicas, name
    assert deployment.services["ccproxy"].scaling.min_replicas >= 2  # more than one Gateway: Redis shares their state


def test_every_variable_is_a_setting() -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    names = [env["name"] for env in raw.get("envs", [])]
    names += [env["name"] for service in raw["services"].values() for env in service.get("envs", [])]
    settings = {f"CCPROXY_{field.upper()}" for field in Settings.model_fields}
    assert names and set(names) <= settings
    assert "CCPROXY_REDIS_URL" in CONFIG.read_text()  # named for the secret
