"""Shipped QR-head adapters: CCPROXY_SCORING_LORA_PATH reads a folder or a shipped name, an unknown
value fails naming both readings, and every shipped file is packaged (wheel and Bento)."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest
import yaml

from ccproxy.compression.adapters import ADAPTER_CONFIG, ADAPTERS_DIR, resolve_adapter, shipped_adapters
from ccproxy.compression.heads import ADAPTER_HEADS_FILE

REPO = Path(__file__).resolve().parents[2]


def test_a_folder_holding_an_adapter_is_itself(tmp_path) -> None:
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    assert resolve_adapter(tmp_path) == tmp_path
    assert resolve_adapter(str(tmp_path)) == tmp_path


def test_a_shipped_name_is_its_folder() -> None:
    names = shipped_adapters()
    assert names, "no adapter ships in ccproxy/compression/adapters/"
    for name in names:
        assert resolve_adapter(name) == ADAPTERS_DIR / name
        # Each carries the head set it was trained for, with the weights it serves with.
        heads = json.loads((ADAPTERS_DIR / name / ADAPTER_HEADS_FILE).read_text())
        assert heads["heads"] and len(heads.get("weights", heads["heads"])) == len(heads["heads"])


def test_an_unknown_value_names_both_readings(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a folder") as error:
        resolve_adapter(tmp_path / "missing")
    for name in shipped_adapters():
        assert name in str(error.value)
    # A name with a slash is a path, never a shipped adapter's name.
    with pytest.raises(FileNotFoundError):
        resolve_adapter(f"../adapters/{shipped_adapters()[0]}")


def test_every_shipped_file_is_packaged() -> None:
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    wheel_patterns = package_data["ccproxy.compression.adapters"]
    bento_patterns = yaml.safe_load((REPO / "bentofile.yaml").read_text())["include"]
    files = [p for name in shipped_adapters() for p in (ADAPTERS_DIR / name).iterdir() if p.is_file()]
    assert files
    for path in files:
        inside = path.relative_to(ADAPTERS_DIR).as_posix()
        assert any(fnmatch.fnmatch(inside, pattern) for pattern in wheel_patterns), inside
        in_repo = path.relative_to(REPO).as_posix()
        assert any(fnmatch.fnmatch(in_repo, pattern.replace("**/", "*")) for pattern in bento_patterns), in_repo
