"""Issue 5, end to end: the farm's advertiser container publishes its servers, a Debian 13
client running avahi-daemon on the test bridge sees them, and `stap --use-server` with no
address picks the aarch64 (cross) server and gets an AArch64 module.

The advertiser container is told MDNS_INTERFACES=<the test bridge's gateway> through the
test's global file: no mDNS leaves on an interface the test did not create.
"""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from farm.core.arch import ARM64, X86_64
from farm.discovery.mdns import parse_stap_version
from farm.discovery.service import advertiser_state, ensure_advertiser
from farm.engine.docker import Engine
from farm.engine.service_specs import advertiser_name as container_name
from farm.manual.cli import main
from farm.manual.config import load_global
from farm.trust import tls as tlsprobe
from tests.support.client import (
    TEST_HOST,
    authorize_cert,
    client_stap,
    network_gateway,
    start_avahi,
    start_client,
)
from tests.support.elf import elf_machine
from tests.support.farm import private_environ
from tests.support.poll import wait_until
from tests.support.resources import retire_advertiser
from tests.support.trees import KernelTrees

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HELLO = 'probe begin { println("hello"); exit() }'


@dataclass
class Farm:
    env: dict[str, str]
    root: Path
    client: Any
    gateway: str
    release: str
    server: dict[str, Any]

    def run(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stderr(err):
            rc = main(list(argv), environ=self.env, stdout=out, stderr=err)
        return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def farm(docker_client: Any, kernel_trees: KernelTrees, farm_environ: dict[str, str],
         session_dir: Path, test_network: Any, test_label: str, test_prefix: str) -> Any:
    kernel_trees.tree(X86_64, ARM64)
    gateway = network_gateway(docker_client, test_network)
    root = session_dir / "discovery"
    env = private_environ(root, farm_environ, f"MDNS_INTERFACES={gateway}\n")
    client = start_client(docker_client, test_network, test_label, hostname_aliases={})
    start_avahi(client)
    f = Farm(env=env, root=root, client=client, gateway=gateway,
             release=kernel_trees.release(ARM64), server={})
    try:
        rc, out, err = f.run("start", "-a", "aarch64", "-r", f.release, "-n", "cross")
        assert rc == 0, out + err
        # `start` brings the advertiser up; calling it again must be harmless (idempotent)
        adv = ensure_advertiser(Engine(docker_client, test_prefix, test_label),
                                load_global([], env))
        assert adv is not None
        rc, out, err = f.run("status", "--json")
        f.server = next(s for s in json.loads(out)["servers"] if s["nickname"] == "cross")
        cert = (root / "state/home/stap-server/.systemtap/ssl/server/stap.cert").read_bytes()
        authorize_cert(client, cert)
        yield f
    finally:
        f.run("stop")
        retire_advertiser(docker_client, test_prefix)


def _unescape(field: str) -> str:
    """avahi-browse -p writes special characters as decimal escapes (`\\032` = space)."""
    return re.sub(r"\\([0-9]{3})", lambda m: chr(int(m.group(1))), field)


def _browse(client: Any) -> list[list[str]]:
    _code, out = client.exec_run(["avahi-browse", "-rtp", "_stap._tcp"])
    rows = [line.split(";") for line in out.decode("utf-8", "replace").splitlines()
            if line.startswith("=;")]
    return [r[:3] + [_unescape(r[3])] + r[4:] for r in rows]


def _advertiser_log(docker_client: Any, prefix: str) -> str:
    c = docker_client.containers.get(container_name(prefix))
    return str(c.logs(tail=40).decode("utf-8", "replace"))


def test_advertiser_container_runs_on_the_test_bridge_only(farm: Farm, docker_client: Any,
                                                           test_prefix: str) -> None:
    state = advertiser_state(Engine(docker_client, test_prefix))
    assert state == (f"mDNS advertiser: running ({container_name(test_prefix)}, "
                     f"on {farm.gateway})")
    c = docker_client.containers.get(container_name(test_prefix))
    assert c.attrs["HostConfig"]["NetworkMode"] == "host"
    assert c.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"


def test_avahi_browse_shows_the_service_with_upstreams_txt(farm: Farm, docker_client: Any,
                                                          test_prefix: str) -> None:
    host = TEST_HOST
    _, v = docker_client.containers.get(farm.server["container"]).exec_run(["stap", "-V"])
    version = parse_stap_version(v.decode())
    certinfo = tlsprobe.certinfo(
        tlsprobe.probe("127.0.0.1", farm.server["port"]).get_serial_number())
    rows = wait_until(lambda: [r for r in _browse(farm.client)
                               if r[8] == str(farm.server["port"])], 60, 0.5)
    log = _advertiser_log(docker_client, test_prefix)
    assert [r[3] for r in rows] == [f"Systemtap Compile Server on {host}"], (rows, log)
    row = rows[0]
    assert row[2] == "IPv4" and row[4] == "_stap._tcp" and row[6] == f"{host}.local"
    assert row[7] == farm.gateway
    txt = row[9]
    for s in (f'"sysinfo={farm.release} arm64"',
              '"optinfo=-BCROSS_COMPILE=aarch64-linux-gnu-"',
              f'"version={version}"', f'"certinfo={certinfo}"'):
        assert s in txt, txt


def test_list_servers_shows_the_aarch64_server(farm: Farm) -> None:
    seen = [""]

    def listed() -> bool:
        rc, seen[0], _ = client_stap(farm.client, ["--list-servers=online,trusted,compatible",
                                                   "-a", "arm64", "-r", farm.release])
        assert rc == 0, seen[0]
        return f'sysinfo="{farm.release} arm64"' in seen[0]

    wait_until(listed, 60, 0.5)
    out = seen[0]
    assert f'sysinfo="{farm.release} arm64"' in out, out
    assert f"port={farm.server['port']}" in out and f"address={farm.gateway}" in out


def test_use_server_with_no_address_gets_an_aarch64_module(farm: Farm) -> None:
    rc, out, modules = client_stap(farm.client, ["--use-server", "-a", "arm64", "-r",
                                                 farm.release, "-p4", "-m", "hello",
                                                 "-e", HELLO])
    assert rc == 0, out
    assert elf_machine(modules["hello.ko"]) == ARM64.elf_machine
