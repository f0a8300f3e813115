"""Production mode's refusals: an empty secret counts as none."""

from __future__ import annotations

from ccproxy.settings import Settings
from ccproxy.startup_checks import production_problems


def test_an_empty_secret_is_unset_so_production_refuses_it() -> None:
    settings = Settings(environment="production", metrics_token="", compressor_url="http://c:3000", compressor_token=" ")
    assert settings.metrics_token is None and settings.compressor_token is None
    assert len(production_problems(settings)) == 2
    assert Settings(upstream_api_key="").upstream_api_key is None  # not a server-held key
