"""Production mode refuses settings that expose something (ccproxy/startup_checks.py)."""

from __future__ import annotations

import pytest

from ccproxy.settings import Settings
from ccproxy.startup_checks import UnsafeConfiguration, production_problems, refuse_unsafe_start


def test_development_allows_an_open_metrics_endpoint() -> None:
    refuse_unsafe_start(Settings(environment="development", compressor_url="http://c:3000"))


def test_production_refuses_open_metrics_unless_allowed_explicitly() -> None:
    with pytest.raises(UnsafeConfiguration, match="CCPROXY_METRICS_TOKEN"):
        refuse_unsafe_start(Settings(environment="production"))
    assert production_problems(Settings(environment="production", metrics_token="t")) == []
    assert production_problems(Settings(environment="production", metrics_allow_open=True)) == []


def test_production_refuses_a_remote_compressor_without_its_token() -> None:
    remote = {"environment": "production", "metrics_token": "t", "compressor_url": "http://c:3000"}
    [problem] = production_problems(Settings(**remote))
    assert "CCPROXY_COMPRESSOR_TOKEN" in problem
    assert production_problems(Settings(**remote, compressor_token="s")) == []


def test_the_refusal_names_no_secret_value() -> None:
    settings = Settings(environment="production", compressor_url="http://c:3000", upstream_api_key="sk-secret-1")
    with pytest.raises(UnsafeConfiguration) as caught:
        refuse_unsafe_start(settings)
    assert "sk-secret-1" not in str(caught.value) and "http://c:3000" not in str(caught.value)
