"""Production mode's refusals: an empty secret counts as none."""

from __future__ import annotations

from ccproxy.settings import Settings
from ccproxy.startup_checks import production_problems


def test_an_empty_secret_is_unset_so_production_refuses_it() -> None:
    settings = Settings(environment="production", metrics_token="", compressor_url="http://c:3000", compressor_token=" ")
    assert settings.metrics_token is None and settings.compressor_token is None
    assert len(production_problems(settings)) == 2
    assert Settings(upstream_api_key="").upstream_api_key is None  # not a server-held key


def test_an_unwritable_data_dir_is_refused_with_what_to_do(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from ccproxy.startup_checks import DataDirUnwritable, writable_data_dir

    assert writable_data_dir(tmp_path / "new" / "data").is_dir()  # created when missing
    assert list((tmp_path / "new" / "data").iterdir()) == []  # the probe file is gone
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A file where the folder should be fails even for root (permissions would not, here).
    with pytest.raises(DataDirUnwritable, match=r"CCPROXY_DATA_DIR=.*a-file/data is not writable.*chown"):
        writable_data_dir(blocker / "data")
