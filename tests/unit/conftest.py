"""Unit-test fixtures (no Docker): see clifakes for the fake backend and the farm layout."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clifakes import Farm, make_farm

from farm.endpoint.modcache import ModuleCache
from farm.endpoint.server import Endpoint, Settings
from tests.support.endpoint_fakes import Running, make_identity


@pytest.fixture
def farm(tmp_path: Path) -> Farm:
    """A farm whose every path (config, stat, log, state, modules) is under tmp_path."""
    return make_farm(tmp_path)


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The farm's identity (PEM cert, key): what the endpoint presents and signs with."""
    return make_identity(tmp_path_factory.mktemp("identity"))


@pytest.fixture(scope="module")
def server_identity(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The fake servers' own certificate (never the farm's)."""
    return make_identity(tmp_path_factory.mktemp("server"), "Systemtap Compile Server (backend)")


@pytest.fixture
def make(identity: tuple[str, str], tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """make(directory, provisioner=None, sign=None, cache=None, **settings) -> Running: an
    endpoint on 127.0.0.1 (a free port) with the farm's identity; stopped at teardown."""
    running: list[Running] = []

    def start(directory: Any, provisioner: Any = None, sign: Any = None, cache: Any = None,
              **kw: Any) -> Running:
        settings = Settings(listen="127.0.0.1", port=0, cert_file=identity[0],
                            key_file=identity[1], **kw)
        r = Running(Endpoint(settings, directory,
                             cache or ModuleCache(tmp_path / "cache", 64 << 20),
                             provisioner, sign))
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop()
