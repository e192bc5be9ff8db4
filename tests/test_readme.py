"""README.md stays true: its configuration reference matches the code."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import config_reference  # noqa: E402


def test_readme_configuration_reference_is_current() -> None:
    readme = ROOT / "README.md"
    assert readme.read_text() == config_reference.refresh(readme), (
        "README.md's configuration table is stale: run python tools/config_reference.py --write"
    )


def test_readme_shows_the_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "pip install . && msilo serve" in text
    assert "make test" in text
