"""Issue 9, faults (docs/reliability.md): a kernel tree removed under a running server, and
the mDNS advertiser following a `kill -9` of the daemon.

One native x86_64 server of a farm with its own resource prefix (`<test prefix>f`), so its
kernel volume holds only this module's tree (headers only: a hello module needs no
debuginfo) and removing that tree cannot disturb the session's shared volumes. Its advertiser
publishes on the test bridge's gateway only (MDNS_INTERFACES), and the python-zeroconf
browsers here are bound to that address only. One Debian 13 stap 5.1 client container.

Measured numbers are printed (run with -s); docs/reliability.md holds them.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.core.arch import X86_64
from farm.kernels import trees as kernels
from farm.trust import tls as tlsprobe
from tests.support.client import (
    default_host_names,
    start_client,
)
from tests.support.elf import elf_machine
from tests.support.farm import Farm, make_farm
from tests.support.mdns_browser import Browser
from tests.support.poll import poll as _poll
from tests.support.resources import retire_advertiser
from tests.support.trees import KernelTrees

pytestmark = [pytest.mark.docker, pytest.mark.slow]

NICK = "faulty"


def say(text: str) -> None:
    """A measurement for docs/reliability.md (visible with pytest -s)."""
    print(f"[faults] {text}", flush=True)


def _script(tag: str) -> str:
    """A hello script no earlier request compiled (stap's cache cannot answer it)."""
    return f'probe begin {{ println("{tag} {uuid.uuid4().hex}"); exit() }}'


@pytest.fixture(scope="module")
def farm(docker_client: Any, kernel_trees: KernelTrees, farm_environ: dict[str, str],
         session_dir: Path, test_network: Any, test_label: str, test_prefix: str,
         gateway: str) -> Iterator[Farm]:
    env = dict(farm_environ, STAPFARM_PREFIX=f"{test_prefix}f")
    client = start_client(docker_client, test_network, test_label)
    rel = kernel_trees.release(X86_64)
    f = make_farm(session_dir / "faults", env, client, default_host_names()[0],
                  {"x86_64": rel}, extra=f"MDNS_INTERFACES={gateway}\n")
    try:
        t0 = time.monotonic()
        rc, out, err = f.run("kernels", "add", "-a", "x86_64", "-r", rel)
        assert rc == 0, out + err
        say(f"kernels add {rel} (headers only, own volume): {time.monotonic() - t0:.1f} s")
        f.start_trusted(NICK)
        yield f
    finally:
        f.run("stop")
        retire_advertiser(docker_client, env["STAPFARM_PREFIX"])


def _hello(farm: Farm, tag: str) -> tuple[int, str, dict[str, bytes], float]:
    t0 = time.monotonic()
    rc, out, modules = farm.stap(farm.server(NICK), ["-m", "hello", "-e", _script(tag)])
    return rc, out, modules, time.monotonic() - t0


def _hello_ok(farm: Farm, tag: str) -> float:
    rc, out, modules, took = _hello(farm, tag)
    assert rc == 0, out
    assert elf_machine(modules["hello.ko"]) == X86_64.elf_machine
    return took


# --------------------------------------------------------------------------- (c) advertiser


def test_advertiser_follows_a_kill_9_of_the_daemon(farm: Farm, gateway: str) -> None:
    server = farm.server(NICK)
    port = server["port"]
    certinfo = tlsprobe.certinfo(tlsprobe.probe("127.0.0.1", port).get_serial_number())
    watcher = Browser(gateway)
    try:
        before = watcher.wait_for_port(port, 120)
        assert before is not None, f"not published on {gateway}: {watcher.events}"
        assert before["txt"]["certinfo"] == certinfo
        killed = time.monotonic()
        os.kill(server["pid"], signal.SIGKILL)  # the daemon's host PID
        after = _poll("server back after kill -9",
                      lambda: farm.answering_again(NICK, server["pid"]), 120, 0.5)
        tls_back = time.monotonic() - killed
        assert after["port"] == port and after["container"] == server["container"]
        # a browser that starts now (empty cache) must find it: published, not remembered
        fresh = Browser(gateway)
        try:
            again = fresh.wait_for_port(port, 120)
            seen = time.monotonic() - killed
        finally:
            fresh.close()
        assert again is not None, f"not published again: {watcher.events}"
        assert again["txt"]["certinfo"] == certinfo
        assert again["txt"]["sysinfo"] == before["txt"]["sysinfo"]
        assert again["name"] == before["name"]
        since = [(round(t - killed, 1), kind) for t, kind, name in watcher.events
                 if t >= killed and name == before["name"]]
        say(f"kill -9 of pid {server['pid']} (port {port}, certinfo {certinfo}): TLS back "
            f"{tls_back:.1f} s later (pid {after['pid']}); a fresh browser on {gateway} "
            f"resolved {again['name']!r} with the same port and certinfo {seen:.1f} s after "
            f"the kill; the first browser's events since: {since or 'none'}")
    finally:
        watcher.close()
    _hello_ok(farm, "after-kill")


# --------------------------------------------------------------------------- (b) kernel tree


def test_docker_refuses_to_remove_the_kernel_volume_in_use(farm: Farm,
                                                           docker_client: Any) -> None:
    import docker.errors

    volume = kernels.volume_name(farm.env["STAPFARM_PREFIX"], X86_64)
    server = farm.server(NICK)
    for force in (False, True):
        with pytest.raises(docker.errors.APIError) as e:
            docker_client.volumes.get(volume).remove(force=force)
        say(f"docker volume rm{' -f' if force else ''} {volume}: {e.value.status_code} "
            f"{e.value.explanation}")
        assert e.value.status_code == 409
        assert "volume is in use" in str(e.value.explanation)
    docker_client.volumes.get(volume)  # still there
    rc, out, err = farm.run("status", "-n", NICK)
    assert rc == 0, out + err
    assert out.splitlines()[0].endswith(f"running as PID {server['pid']}"), out
    assert "missing" not in out
    _hello_ok(farm, "volume-kept")


def test_kernel_tree_removed_under_a_running_server(farm: Farm) -> None:
    rel = farm.releases["x86_64"]
    warm = _hello_ok(farm, "before-remove")
    server = farm.server(NICK)
    assert server["problems"] == []

    rc, out, err = farm.run("kernels", "remove", "-a", "x86_64", "-r", rel)
    assert rc == 0, out + err
    assert f"removed kernel tree {rel}" in out
    assert f"warning: running servers still use it ({NICK})" in err, err
    say(f"kernels remove while {NICK} runs: rc {rc}: {out.strip()} {err.strip()}")

    problem = f"kernel tree {rel} (x86_64) missing: stap-server kernels add -a x86_64 -r {rel}"
    rc, out, err = farm.run("status")
    say(f"status after the remove: rc {rc}:\n{out.rstrip()}")
    assert rc == 1, out + err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if f'-n "{NICK}"' in line)
    assert lines[at].endswith(f"running as PID {server['pid']}")
    assert lines[at + 1] == f"  {problem}"
    _, out, _ = farm.run("status", "--json")
    doc = json.loads(out)
    assert doc["exit_code"] == 1
    entry = next(s for s in doc["servers"] if s["nickname"] == NICK)
    assert (entry["state"], entry["pid"], entry["problems"]) == ("running", server["pid"],
                                                                [problem])

    rc, out, modules, took = _hello(farm, "tree-gone")
    say(f"client request with the tree gone: rc {rc} after {took:.1f} s: "
        f"{[line for line in out.splitlines() if line.strip()][-4:]}")
    assert rc != 0 and modules == {}
    assert f'Checking "/lib/modules/{rel}/build/.config" failed' in out, out
    assert "Passes: via server failed" in out, out

    t0 = time.monotonic()
    rc, out, err = farm.run("kernels", "add", "-a", "x86_64", "-r", rel)
    assert rc == 0, out + err
    readd = time.monotonic() - t0
    rc, out, err = farm.run("status", "-n", NICK)
    assert rc == 0 and "missing" not in out, out + err
    after = farm.server(NICK)
    assert (after["pid"], after["container"], after["problems"]) == (
        server["pid"], server["container"], [])  # no restart was needed
    took = _hello_ok(farm, "tree-back")
    say(f"tree re-added in {readd:.1f} s; same PID {after['pid']}; hello {took:.1f} s "
        f"(warm before the remove: {warm:.1f} s)")
