from __future__ import annotations

from pathlib import Path

from ccproxy.settings import markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_matches_the_settings() -> None:
    assert markdown_table() in README.read_text()
