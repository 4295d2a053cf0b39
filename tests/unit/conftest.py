"""Unit-test fixtures (no Docker): see clifakes for the fake backend and the farm layout."""

from __future__ import annotations

from pathlib import Path

import pytest
from clifakes import Farm, make_farm


@pytest.fixture
def farm(tmp_path: Path) -> Farm:
    """A farm whose every path (config, stat, log, state, modules) is under tmp_path."""
    return make_farm(tmp_path)
