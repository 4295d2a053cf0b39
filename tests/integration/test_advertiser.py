"""Issue 5, shown with python-zeroconf: a browser on the test bridge sees exactly the farm's
services appear when a server starts and disappear (goodbyes) on stop and on `docker kill`.

Every mDNS socket here (advertiser and browser) is bound to the test bridge's gateway address
only. The farm itself runs with MDNS_INTERFACES=none, so no advertiser container competes with
the one under test.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest

from farm.core import labels
from farm.core.arch import ARM64
from farm.discovery.advertiser import Advertiser
from farm.discovery.mdns import SERVICE_TYPE
from farm.engine.docker import Engine
from farm.manual.cli import main
from farm.trust import tls as tlsprobe
from tests.support.client import TEST_HOST
from tests.support.farm import private_environ
from tests.support.mdns_browser import Browser
from tests.support.poll import poll as wait_for
from tests.support.resources import retire_advertiser
from tests.support.trees import KernelTrees

pytestmark = [pytest.mark.docker]


class Farm:
    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.env, self.root = env, root

    def run(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stderr(err):
            rc = main(list(argv), environ=self.env, stdout=out, stderr=err)
        return rc, out.getvalue(), err.getvalue()

    def servers(self) -> list[dict[str, Any]]:
        _rc, out, _err = self.run("status", "--json")
        return list(json.loads(out)["servers"]) if out.strip() else []


@pytest.fixture(scope="module")
def farm(kernel_trees: KernelTrees, farm_environ: dict[str, str], session_dir: Path,
         docker_client: Any, test_prefix: str) -> Any:
    kernel_trees.tree(ARM64, ARM64)  # headers only: the emulated server needs no debuginfo
    retire_advertiser(docker_client, test_prefix)  # left by another test module
    root = session_dir / "advertiser"
    f = Farm(private_environ(root, farm_environ, "MDNS_INTERFACES=none\n"), root)
    yield f
    f.run("stop")


@pytest.fixture
def browser(gateway: str) -> Iterator[Browser]:
    b = Browser(gateway)
    yield b
    b.close()


@pytest.fixture
def advertiser(gateway: str, test_prefix: str) -> Iterator[Advertiser]:
    adv = Advertiser(lambda: Engine.connect(prefix=test_prefix), test_prefix, [gateway], "127.0.0.1",
                     resync_interval=2.0)
    adv.start()
    yield adv
    adv.close()


def _start(farm: Farm, kernel_trees: KernelTrees) -> dict[str, Any]:
    rel = kernel_trees.release(ARM64)
    rc, out, err = farm.run("start", "-a", "aarch64", "-r", rel, "--strategy", "emulated",
                            "-n", "emu")
    assert rc == 0, out + err
    return next(s for s in farm.servers() if s["nickname"] == "emu")


def _expected_txt(farm: Farm, docker_client: Any, server: dict[str, Any], rel: str) -> bytes:
    cert = tlsprobe.probe("127.0.0.1", server["port"])
    certinfo = tlsprobe.certinfo(cert.get_serial_number())
    stored = farm.root / "state/home/stap-server/.systemtap/ssl/server/stap.cert"
    from cryptography import x509

    assert x509.load_der_x509_certificate(stored.read_bytes()).serial_number == \
        cert.get_serial_number()
    _code, out = docker_client.containers.get(server["container"]).exec_run(["stap", "-V"])
    version = re.search(r"\(version ([0-9.]+)/", out.decode()).group(1)  # type: ignore[union-attr]
    strings = [f"sysinfo={rel} arm64", "optinfo=", f"version={version}",
               f"certinfo={certinfo}"]
    return b"".join(bytes([len(s)]) + s.encode() for s in strings)


def test_services_appear_on_start_and_go_on_stop_and_on_docker_kill(
        farm: Farm, kernel_trees: KernelTrees, docker_client: Any, browser: Browser,
        advertiser: Advertiser, gateway: str) -> None:

    host = TEST_HOST
    expected = f"Systemtap Compile Server on {host}.{SERVICE_TYPE}"
    rel = kernel_trees.release(ARM64)
    assert browser.current() == set()

    server = _start(farm, kernel_trees)
    wait_for("the service to appear", lambda: browser.current() == {expected}, 60)
    info = browser.info(expected, timeout_ms=5000)
    assert info is not None, f"{expected} did not resolve"
    assert info.port == server["port"]
    assert info.parsed_addresses() == [gateway]
    assert info.server == f"{host}.local."
    assert info.text == _expected_txt(farm, docker_client, server, rel)

    rc, out, err = farm.run("stop")
    assert rc == 0, out + err
    wait_for("the service to go on stop", lambda: browser.current() == set(), 60)
    assert browser.saw("Removed", expected)

    server = _start(farm, kernel_trees)
    wait_for("the service to come back", lambda: browser.current() == {expected}, 60)
    browser.events.clear()
    docker_client.containers.get(server["container"]).kill()
    wait_for("the service to go on docker kill", lambda: browser.saw("Removed", expected), 60)


def test_advertiser_restart_withdraws_and_readvertises(
        farm: Farm, kernel_trees: KernelTrees, browser: Browser, gateway: str,
        test_prefix: str, docker_client: Any) -> None:
    live = [s for s in farm.servers() if s["state"] == "running"]
    if not live:
        _start(farm, kernel_trees)
    first = Advertiser(lambda: Engine.connect(prefix=test_prefix), test_prefix, [gateway], "127.0.0.1")
    first.start()
    try:
        wait_for("the service to appear", lambda: len(browser.current()) == 1, 60)
    finally:
        first.close()
    wait_for("goodbyes when the advertiser stops", lambda: browser.current() == set(), 60)
    second = Advertiser(lambda: Engine.connect(prefix=test_prefix), test_prefix, [gateway], "127.0.0.1")
    second.start()
    try:
        wait_for("the service to reappear", lambda: len(browser.current()) == 1, 60)
    finally:
        second.close()
    servers = docker_client.containers.list(filters={"label": [
        f"{labels.OWNER}={test_prefix}", f"{labels.KIND}=server"]})
    assert servers, "the server kept running through the advertiser's restart"
