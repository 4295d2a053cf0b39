"""Issue 10: the farm endpoint — one address for every target, routed by the request,
validated, answered from a module cache, provisioning what nobody serves yet.

Real Docker engine, the farm's images and kernel trees, the endpoint in its container on the
host network, and the Debian 13 `stap` 5.1 client in a container that knows the farm by this
host's name and trusts the farm's identity (the endpoint's certificate; the servers behind it
have their own, which the client never trusts). The attacks: test_endpoint_attacks.py.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import ssl
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.core import labels
from farm.core.arch import ARM64, X86_64
from farm.endpoint import containers as endpoint_service
from farm.engine import service_specs
from farm.engine.docker import Engine
from farm.engine.trees import TreeStore
from farm.kernels import trees as kernels
from tests.support.client import authorize_cert, client_stap, default_host_names, start_client
from tests.support.elf import elf_machine
from tests.support.farm import Farm, make_farm
from tests.support.poll import poll as _poll
from tests.support.trees import SUITES, KernelTrees
from tests.support.wire_client import exchange, tls

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TRACEPOINT = 'probe kernel.trace("sched:sched_switch") { printf("%d\\n", $next->pid); exit() }'
IDLE_TIMEOUT = 8  # ENDPOINT_IDLE_TIMEOUT of this farm (seconds)
PROVISION_IDLE = 60  # ENDPOINT_PROVISION_IDLE: provisioned servers unused this long go
IMAGE_PREFIX = "stapfarm/epserver"  # this module's private tag of the server images


def hello(text: str) -> str:
    return f'probe begin {{ println("{text}"); exit() }}'


def say(text: str) -> None:
    print(f"[endpoint] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Endpoint:
    """The farm under test, its endpoint's port and metrics."""

    def __init__(self, farm: Farm, port: int, metrics_port: int,
                 provision_target: tuple[str, str], mirror: Any) -> None:
        self.farm = farm
        self.mirror = mirror
        self.port = port
        self.metrics_port = metrics_port
        self.provision_target = provision_target  # (arch, release) nobody serves at first

    def metrics(self) -> dict[str, float]:
        return endpoint_service.metrics(self.metrics_port)

    def outcome(self, outcome: str) -> float:
        """Requests with OUTCOME so far, over every target."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            text = r.read().decode()
        total = 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "stapfarm_endpoint_requests_total" and \
                        s.labels.get("outcome") == outcome:
                    total += s.value
        return total

    def stap(self, arch: str, release: str, args: list[str],
             files: dict[str, str | bytes] | None = None) -> tuple[int, str, dict[str, bytes]]:
        return client_stap(self.farm.client, [f"--use-server={self.farm.host}:{self.port}",
                                              "-a", arch, "-r", release, "-p4", *args], files)


@pytest.fixture(scope="module")
def ep(docker_client: Any, kernel_trees: KernelTrees, farm_environ: dict[str, str],
       session_dir: Path, test_network: Any, test_label: str, mirror: Any) -> Iterator[Endpoint]:
    for target in (X86_64, ARM64):
        kernel_trees.tree(X86_64, target)
    # The private image tag (same image) lets one test swap in a changed image.
    for arch in ("x86_64", "aarch64"):
        docker_client.images.get(f"stapfarm/server:{arch}").tag(IMAGE_PREFIX, arch)
    rel = {"x86_64": kernel_trees.release(X86_64), "arm64": kernel_trees.release(ARM64)}
    older = [r for r in kernels.available(mirror, ("trixie",), X86_64) if r != rel["x86_64"]]
    # A target nobody serves: an older x86_64 release (its tree is downloaded on demand),
    # else the arm64 release (its tree is present; only the server is provisioned).
    target = ("x86_64", older[0]) if older else ("arm64", rel["arm64"])
    port, mport = _free_port(), _free_port()
    client = start_client(docker_client, test_network, test_label)
    f = make_farm(session_dir / "endpoint", farm_environ, client, default_host_names()[0], rel,
                  extra=f"IMAGE_PREFIX={IMAGE_PREFIX}\nENDPOINT_PORT={port}\n"
                        f"ENDPOINT_METRICS_PORT={mport}\nENDPOINT_PROVISION=yes\n"
                        f"ENDPOINT_OFFER={target[0]}:{target[1]} x86_64:{rel['x86_64']} "
                        f"arm64:{rel['arm64']}\nENDPOINT_IDLE_TIMEOUT={IDLE_TIMEOUT}\n"
                        f"ENDPOINT_PROVISION_IDLE={PROVISION_IDLE}\n"
                        # fifty idle connections come from loopback, one source address:
                        # above the default per-source cap (32) so that the cap is not what
                        # that test measures (test_endpoint_attacks tests the cap)
                        "ENDPOINT_MAX_PER_SOURCE=64\n")
    try:
        rc, out, err = f.run("start", "-a", "x86_64", "-r", rel["x86_64"], "-n", "epx")
        assert rc == 0, out + err
        if target[0] == "x86_64":  # else the arm64 target is the provisioning test's
            rc, out, err = f.run("start", "-a", "aarch64", "-r", rel["arm64"], "-n", "epa")
            assert rc == 0, out + err
        t0 = time.monotonic()
        rc, out, err = f.run("endpoint", "start")
        assert rc == 0, out + err
        say(f"endpoint start: {time.monotonic() - t0:.1f} s (incl. image check)")
        authorize_cert(client, f.farm_cert())
        yield Endpoint(f, port, mport, target, mirror)
    finally:
        say(endpoint_logs(docker_client, f.env["STAPFARM_PREFIX"]))
        f.run("endpoint", "stop")
        f.run("stop")
        for arch in ("x86_64", "aarch64"):
            try:
                docker_client.images.remove(f"{IMAGE_PREFIX}:{arch}")
            except Exception as e:  # noqa: BLE001 - already gone
                say(f"{IMAGE_PREFIX}:{arch} not removed: {e}")


def endpoint_logs(docker_client: Any, prefix: str, tail: int = 60) -> str:
    """The last lines of the endpoint's two containers (for the test's report)."""
    out = []
    for name in (service_specs.frontdoor_name(prefix), service_specs.broker_name(prefix)):
        try:
            logs = docker_client.containers.get(name).logs(tail=tail).decode("utf-8", "replace")
        except Exception as e:  # noqa: BLE001 - only for the report
            logs = f"(no log: {e})"
        out.append(f"--- {name} (tail):\n{logs}")
    return "\n".join(out)


def test_one_address_compiles_for_both_targets(ep: Endpoint) -> None:
    rel = ep.farm.releases
    built = ep.outcome("built")
    for arch, machine in (("x86_64", X86_64.elf_machine), ("arm64", ARM64.elf_machine)):
        if arch == "arm64" and ep.provision_target[0] == "arm64":
            continue  # that target is the provisioning test's
        t0 = time.monotonic()
        rc, out, modules = ep.stap(arch, rel[arch], ["-m", "hello", "-e", hello("one door")])
        say(f"{arch} hello through the endpoint (cold): {time.monotonic() - t0:.1f} s")
        assert rc == 0, out
        assert elf_machine(modules["hello.ko"]) == machine
    assert ep.outcome("built") > built


def test_a_repeat_is_answered_from_the_cache_byte_identical(ep: Endpoint) -> None:
    rel = ep.farm.releases["x86_64"]
    args = ["-m", "tp", "-e", TRACEPOINT]
    t0 = time.monotonic()
    rc, out, first = ep.stap("x86_64", rel, args)
    cold = time.monotonic() - t0
    assert rc == 0, out
    hits = ep.metrics().get("stapfarm_endpoint_cache_hits_total", 0)
    t0 = time.monotonic()
    rc, out, again = ep.stap("x86_64", rel, args)
    warm = time.monotonic() - t0
    assert rc == 0, out
    assert again["tp.ko"] == first["tp.ko"]
    assert elf_machine(again["tp.ko"]) == X86_64.elf_machine
    assert ep.metrics()["stapfarm_endpoint_cache_hits_total"] == hits + 1
    say(f"tracepoint through the endpoint: cold {cold:.1f} s, repeat {warm:.2f} s (client "
        f"wall time; module {hashlib.sha256(first['tp.ko']).hexdigest()[:12]})")


def test_a_changed_image_misses_the_cache(ep: Endpoint, docker_client: Any) -> None:
    rel = ep.farm.releases["x86_64"]
    args = ["-m", "img", "-e", hello("image")]
    rc, out, _ = ep.stap("x86_64", rel, args)
    assert rc == 0, out
    rc, out, _ = ep.stap("x86_64", rel, args)
    assert rc == 0, out
    built = ep.outcome("built")
    # A different image under the server's tag (one more layer of metadata), the server
    # restarted on it: the same request must be built again, not served from the cache.
    base = docker_client.images.get(f"{IMAGE_PREFIX}:x86_64")
    container = docker_client.containers.create(base.id)  # never started: only committed
    try:
        changed = container.commit(repository=IMAGE_PREFIX, tag="x86_64",
                                   changes=["LABEL org.stapfarm.test-variant=1"])
    finally:
        container.remove(force=True)
    assert changed.id != base.id
    rc, out, err = ep.farm.run("restart", "-n", "epx")
    assert rc == 0, out + err
    server = ep.farm.server("epx")
    assert docker_client.containers.get(server["container"]).attrs["Image"] == changed.id
    rc, out, modules = ep.stap("x86_64", rel, args)
    assert rc == 0, out
    assert elf_machine(modules["img.ko"]) == X86_64.elf_machine
    assert ep.outcome("built") == built + 1


def test_an_oversized_request_gets_the_endpoints_error(ep: Endpoint) -> None:
    rel = ep.farm.releases["x86_64"]
    noise = hashlib.shake_256(b"incompressible").digest(17 * 1024 * 1024)  # > 16 MiB zipped
    rc, out, _ = ep.stap("x86_64", rel, ["-I", "big", "-e", hello("big")],
                         {"big/noise.stp": noise})
    assert rc != 0
    assert re.search(r"Server: request of \d+ bytes exceeds this farm's limit of 16777216 "
                     r"bytes compressed", out), out
    say("oversized request: " + next(line for line in out.splitlines() if "Server:" in line))


@pytest.mark.parametrize("payload,expected", [
    (struct.pack(">i", 12) + b"not a zip!!!", "request is not a zip archive"),
    (struct.pack(">i", -5), "invalid request length -5"),
])
def test_hostile_requests_are_answered(ep: Endpoint, payload: bytes, expected: str) -> None:
    response = exchange(ep.port, payload)
    with zipfile.ZipFile(io.BytesIO(response)) as z:
        assert z.read("rc") == b"1"
        assert expected in z.read("stderr").decode()
        assert "stap000000/" in z.namelist()


def test_fifty_idle_connections_do_not_stop_a_real_client(ep: Endpoint) -> None:
    idle = [tls(ep.port) for _ in range(50)]
    try:
        _poll("50 idle connections open", lambda: ep.metrics().get(
            "stapfarm_endpoint_connections", 0) >= 50, 30)
        t0 = time.monotonic()
        rc, out, modules = ep.stap("x86_64", ep.farm.releases["x86_64"],
                                   ["-m", "busy", "-e", hello("while 50 idle")])
        say(f"hello with 50 idle connections open: {time.monotonic() - t0:.1f} s")
        assert rc == 0, out
        assert elf_machine(modules["busy.ko"]) == X86_64.elf_machine
        # The idle ones are closed by the endpoint once the idle deadline passes.
        t0 = time.monotonic()
        _poll("idle connections closed", lambda: ep.metrics().get(
            "stapfarm_endpoint_connections", 99) == 0, IDLE_TIMEOUT + 30)
        say(f"50 idle connections closed {time.monotonic() - t0:.1f} s after the compile "
            f"(ENDPOINT_IDLE_TIMEOUT={IDLE_TIMEOUT})")
        for s in idle:
            assert _closed_by_peer(s)
    finally:
        for s in idle:
            s.close()


def _closed_by_peer(s: ssl.SSLSocket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(1) == b""
    except (ssl.SSLEOFError, ConnectionResetError):
        return True


def test_a_target_not_offered_is_answered_with_what_is_available(ep: Endpoint) -> None:
    rc, out, _ = ep.stap("arm64", "6.0.0-nosuch-arm64", ["-e", hello("nowhere")])
    assert rc != 0
    line = next((x for x in out.splitlines() if x.startswith("Server:")), "")
    assert "no server for 6.0.0-nosuch-arm64 arm64" in line and "not offered" in line, out
    assert ep.farm.releases["x86_64"] in line


def test_a_release_nobody_serves_is_provisioned_on_demand(ep: Endpoint,
                                                          docker_client: Any) -> None:
    arch, release = ep.provision_target
    prefix = ep.farm.env["STAPFARM_PREFIX"]
    assert not any(release in c.labels.get(labels.RELEASES, "") and
                   c.labels.get(labels.CONFIG, "").find(f'"arch": "{arch}"') >= 0
                   for c in docker_client.containers.list(filters={"label": [
                       f"{labels.OWNER}={prefix}", f"{labels.KIND}=server"]}))
    t0 = time.monotonic()
    rc, out, modules = ep.stap(arch, release, ["-m", "fresh", "-e", hello("provisioned")])
    took = time.monotonic() - t0
    assert rc == 0, out
    machine = X86_64.elf_machine if arch == "x86_64" else ARM64.elf_machine
    assert elf_machine(modules["fresh.ko"]) == machine
    say(f"{release} ({arch}) provisioned on demand and compiled: {took:.1f} s")
    servers = [s for s in ep.farm.status() if s["config"]["releases"] == [release]]
    assert len(servers) == 1 and servers[0]["nickname"].startswith("auto-")
    m = ep.metrics()
    assert m.get("stapfarm_endpoint_provisioning_total", 0) >= 2  # started + ready

    # The tree replaced under the running server: first a clear error, then a rebuild.
    store = TreeStore(Engine(docker_client, prefix, ep.farm.env.get("STAPFARM_TEST_LABEL", "")),
                      X86_64, f"{IMAGE_PREFIX}:x86_64")
    tree = store.get(release)
    assert tree is not None
    assert store.remove(release)
    _poll("the endpoint notices the missing tree", lambda: _answer_mentions(
        ep, arch, release, "kernel tree"), 30, step=1)
    store.add(ep.mirror, SUITES, X86_64 if arch == "x86_64" else ARM64, release,
              debuginfo=tree.debuginfo)
    built = ep.outcome("built")
    _poll("the re-added tree is served", lambda: ep.stap(
        arch, release, ["-m", "fresh", "-e", hello("provisioned")])[0] == 0, 120, step=2)
    assert ep.outcome("built") >= built + 1  # not the cached module of the old tree

    # Unused for ENDPOINT_PROVISION_IDLE seconds, the provisioned server is retired.
    t0 = time.monotonic()
    _poll("the idle provisioned server is retired", lambda: not [
        s for s in ep.farm.status() if s["config"] and s["config"]["releases"] == [release]],
        PROVISION_IDLE + 90, step=2)
    say(f"provisioned server retired {time.monotonic() - t0:.0f} s after its last use "
        f"(ENDPOINT_PROVISION_IDLE={PROVISION_IDLE})")


def _answer_mentions(ep: Endpoint, arch: str, release: str, text: str) -> bool:
    rc, out, _ = ep.stap(arch, release, ["-m", "fresh", "-e", hello("provisioned")])
    return rc != 0 and text in out


def test_status_shows_the_endpoint_and_its_cache(ep: Endpoint) -> None:
    rc, out, err = ep.farm.run("status")
    line = next((x for x in out.splitlines() if x.startswith("farm endpoint:")), "")
    assert f"running on port {ep.port}" in line, out + err
    assert re.search(r"cache \d+ hits, \d+ misses, [0-9.]+ MiB in \d+ modules", line), line
    rc, out, err = ep.farm.run("endpoint", "status")
    assert rc == 0 and out.startswith("farm endpoint: running"), out + err
    m = ep.metrics()
    assert m["stapfarm_endpoint_cache_hits_total"] >= 1
    assert m["stapfarm_endpoint_cache_entries"] >= 1
    assert m["stapfarm_endpoint_request_seconds_count"] >= 1
    say("status: " + line)


def test_endpoint_stop_takes_the_servers_it_provisioned(ep: Endpoint, docker_client: Any) -> None:
    # This module's last test: it stops the endpoint. `make down` relies on this: a server
    # the endpoint provisioned belongs to no compose project and nothing else retires it.
    arch, release = ep.provision_target
    rc, out, _ = ep.stap(arch, release, ["-m", "again", "-e", hello("before stop")])
    assert rc == 0, out
    prefix = ep.farm.env["STAPFARM_PREFIX"]
    flt = {"label": [f"{labels.OWNER}={prefix}", labels.PROVISIONED]}
    assert docker_client.containers.list(all=True, filters=flt), "nothing was provisioned"
    configured = ep.farm.server("epx")
    say(endpoint_logs(docker_client, prefix))  # the fixture's teardown finds them gone
    rc, out, err = ep.farm.run("endpoint", "stop")
    assert rc == 0, out + err
    assert "farm endpoint: stopped" in out and "removed 1 server(s) it had provisioned" in out
    assert docker_client.containers.list(all=True, filters=flt) == []
    # the servers the operator started stay
    assert ep.farm.server("epx")["container"] == configured["container"]
