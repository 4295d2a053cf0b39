"""Issue 9, fault: the Docker engine restarted under a running farm (docs/reliability.md).

dockerd is stopped with SIGTERM and started again the way scripts/setup.sh starts it
(`nohup dockerd >>/var/log/stapfarm/dockerd.log 2>&1 </dev/null &`), detached with setsid
so it outlives pytest. The farm's server must come back by its restart policy on the same
host port with the same certificate, `stap-server status` must say so, the real client must
compile through it again, and the advertiser container must come back and publish it again
(on the test bridge only: MDNS_INTERFACES and the browser are bound to its gateway).

The module is named to run last among the e2e modules (pytest collects them alphabetically):
a restart stops every container on the engine. No session-scoped fixture keeps a running
container (conftest.py creates only networks and volumes, and removes its job containers),
so the integration and unit tests a full `pytest tests` runs afterwards need nothing that
the restart stopped. This module's own client container has no restart policy: the test
starts it again.

Coordination with other sessions on the same engine: the test creates
/tmp/ENGINE_RESTART_RUNNING, waits (with a deadline) until no other pytest process runs,
restarts the engine, and removes the file once the engine is back; the engine is restored
in a `finally` whatever happens. Measured numbers are printed (run with -s).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.core.arch import X86_64
from farm.engine.service_specs import advertiser_name as container_name
from farm.trust import tls as tlsprobe
from tests.support.client import (
    default_host_names,
    start_client,
)
from tests.support.elf import elf_machine
from tests.support.farm import Farm, make_farm
from tests.support.mdns_browser import Browser
from tests.support.poll import poll as _poll
from tests.support.poll import wait_until
from tests.support.resources import retire_advertiser
from tests.support.trees import KernelTrees

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.engine_restart]

NICK = "survivor"
HELLO = 'probe begin { println("hello"); exit() }'
LOCK = Path("/tmp/ENGINE_RESTART_RUNNING")
DOCKERD_LOG = Path("/var/log/stapfarm/dockerd.log")
PIDFILE = Path("/var/run/docker.pid")
OTHERS_TIMEOUT = 1200.0  # waiting for other pytest sessions to finish
ENGINE_TIMEOUT = 180.0  # dockerd stopping, then `docker info` answering again


def say(text: str) -> None:
    print(f"[engine-restart] {text}", flush=True)


# --------------------------------------------------------------------------- the engine


def _docker_info_ok() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20,
                              check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _dockerd_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "dockerd":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def other_pytests() -> list[str]:
    """Command lines of pytest processes that are not this one or one of its ancestors."""
    mine, found = _ancestors(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
        if _runs_pytest(words):
            found.append(f"{entry.name}: {' '.join(words)[:160]}")
    return found


def _runs_pytest(words: list[str]) -> bool:
    """Whether a command line runs pytest (`pytest ...`, `python -m pytest ...`): not merely
    mentions it, as a test's server does with a log path under /tmp/pytest-of-root/."""
    head = words[:3]
    if any(os.path.basename(w) in ("pytest", "py.test") for w in head):
        return True
    return any(w == "-m" and nxt in ("pytest", "py.test") for w, nxt in zip(head, words[1:4]))


def start_dockerd() -> None:
    """As scripts/setup.sh does, in a session of its own so it outlives pytest."""
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(DOCKERD_LOG, "ab") as log, open(os.devnull, "rb") as null:
        subprocess.Popen([shutil.which("dockerd") or "dockerd"], stdin=null, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)


def restore_engine() -> None:
    """Whatever state the restart left: make `docker info` work again (with a deadline)."""
    if _docker_info_ok():
        return
    deadline = time.monotonic() + ENGINE_TIMEOUT
    wait_until(lambda: not _dockerd_pids(), ENGINE_TIMEOUT, 0.5)  # still shutting down
    if not _dockerd_pids():
        start_dockerd()
    if not wait_until(_docker_info_ok, max(0.0, deadline - time.monotonic()), 0.5):
        raise RuntimeError(f"the Docker engine did not come back; see {DOCKERD_LOG}")


def restart_engine() -> dict[str, float]:
    """SIGTERM dockerd, wait for it to exit, start it again, wait for `docker info`."""
    pid = int(PIDFILE.read_text().strip())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd", pid
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    _poll("dockerd exited", lambda: not Path(f"/proc/{pid}").exists(), ENGINE_TIMEOUT, 0.2)
    stopped = time.monotonic()
    start_dockerd()
    _poll("`docker info` works again", _docker_info_ok, ENGINE_TIMEOUT, 0.5)
    up = time.monotonic()
    return {"stop": stopped - t0, "start": up - stopped, "t_up": up}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def farm(docker_client: Any, kernel_trees: KernelTrees, farm_environ: dict[str, str],
         session_dir: Path, test_network: Any, test_label: str, test_prefix: str,
         gateway: str) -> Iterator[Farm]:
    kernel_trees.tree(X86_64, X86_64)
    client = start_client(docker_client, test_network, test_label)
    f = make_farm(session_dir / "engine-restart", farm_environ, client,
                  default_host_names()[0], {"x86_64": kernel_trees.release(X86_64)},
                  extra=f"MDNS_INTERFACES={gateway}\n")
    try:
        f.start_trusted(NICK)
        yield f
    finally:
        f.run("stop")
        retire_advertiser(docker_client, test_prefix)


def _hello(farm: Farm) -> float:
    t0 = time.monotonic()
    rc, out, modules = farm.stap(farm.server(NICK), ["-m", "hello", "-e", HELLO])
    assert rc == 0, out
    assert elf_machine(modules["hello.ko"]) == X86_64.elf_machine
    return time.monotonic() - t0


# --------------------------------------------------------------------------- the test


def test_engine_restart_brings_the_farm_back(farm: Farm, docker_client: Any, gateway: str,
                                             test_prefix: str) -> None:
    before = farm.server(NICK)
    port = before["port"]
    serial = tlsprobe.probe("127.0.0.1", port).get_serial_number()
    certinfo = tlsprobe.certinfo(serial)
    advertiser = docker_client.containers.get(container_name(test_prefix))
    published = Browser(gateway)
    try:
        svc = published.wait_for_port(port, 120)
    finally:
        published.close()
    assert svc is not None and svc["txt"]["certinfo"] == certinfo
    _hello(farm)

    LOCK.touch()
    try:
        if not wait_until(lambda: not other_pytests(), OTHERS_TIMEOUT, 2):
            pytest.fail("other pytest sessions kept running; not restarting the shared "
                        "engine under them:\n  " + "\n  ".join(other_pytests()))
        try:
            took = restart_engine()
        finally:
            restore_engine()
    finally:
        LOCK.unlink(missing_ok=True)
    docker_client.api.close()  # pooled connections went with the old daemon
    say(f"dockerd: stopped {took['stop']:.1f} s after SIGTERM (it stops every container), "
        f"`docker info` answered {took['start']:.1f} s after the new start")

    first_rc, first, _ = farm.run("status")
    say(f"first status right after `docker info` answered: rc {first_rc}: "
        f"{first.strip().splitlines()[0] if first.strip() else ''}")

    def back() -> dict[str, Any] | None:
        if farm.run("status", "-n", NICK)[0] != 0:
            return None
        return farm.answering_again(NICK, before["pid"])

    after = _poll("server back after the engine restart", back, 120, 0.5)
    tls_back = time.monotonic() - took["t_up"]
    rc, out, err = farm.run("status")
    assert rc == 0, out + err
    assert f'-n "{NICK}"' in out and f"running as PID {after['pid']}" in out
    assert after["port"] == port and after["container"] == before["container"]
    assert after["pid"] != before["pid"] and after["problems"] == []
    assert Path(f"/proc/{after['pid']}/comm").read_text().strip() == "stap-serverd"
    assert tlsprobe.probe("127.0.0.1", port).get_serial_number() == serial
    c = docker_client.containers.get(after["container"])
    assert c.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"

    advertiser.reload()
    assert advertiser.status == "running"
    assert f"mDNS advertiser: running ({container_name(test_prefix)}, on {gateway})" in out
    fresh = Browser(gateway)
    try:
        again = fresh.wait_for_port(port, 120)
        seen = time.monotonic() - took["t_up"]
    finally:
        fresh.close()
    assert again is not None, "the advertiser did not publish the server again"
    assert again["txt"]["certinfo"] == certinfo and again["name"] == svc["name"]

    farm.client.reload()
    client_state = farm.client.status
    farm.client.start()  # the client container has no restart policy
    _poll("client container running", lambda: farm.client.reload() or
          farm.client.status == "running", 60)
    took_hello = _hello(farm)
    say(f"after the engine came back: server answering TLS {tls_back:.1f} s later on port "
        f"{port} (pid {before['pid']} -> {after['pid']}, same container, serial {serial:#x}); "
        f"status rc {rc}; advertiser {advertiser.status} and publishing again {seen:.1f} s "
        f"after; client container was {client_state!r}, restarted; hello {took_hello:.1f} s")
