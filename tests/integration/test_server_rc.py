"""The per-request limits file a farm server writes into its home (`~/.systemtap/rc`).

Every stap the server spawns applies the rc's rlimits. stap runs kbuild in parallel
(`make -jCPUS+1`) only when RLIMIT_NPROC is *more* than 30 x CPUs; upstream's RPM writes
exactly 30 x CPUs, which makes every compile serial. The farm's image writes its rc at
start, from the CPUs of the machine it runs on (images/server-entry.sh), replaces the rc
earlier farm images wrote (upstream's values, serial kbuild) and keeps any other rc, which is
the user's.

Each case starts the real image with its real entry script and a fresh home (a bind mount,
as the farm's), waits until stap-serverd runs (the entry script has finished by then), and
reads the home.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from farm.core import labels
from farm.core.arch import X86_64
from farm.engine import images
from tests.support.poll import poll

pytestmark = pytest.mark.docker

UPSTREAM = ("--rlimit-as=4294967296 --rlimit-cpu=60 --rlimit-nproc={n} --rlimit-stack=1024000 "
            "--rlimit-fsize=51200000")


def _start_with_home(docker_client: Any, image: str, home: Path, label: str) -> str:
    """Run IMAGE's entry with HOME until stap-serverd is up; return the rc it left there."""
    uid = images.server_uid()
    os.chown(home, uid, uid)
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, uid)
    c = docker_client.containers.run(
        image, command=["--port", "0"], detach=True, network_mode="none",
        volumes={str(home): {"bind": "/home/stap-server", "mode": "rw"}},
        labels={labels.TEST: label, labels.KIND: "job"})
    try:
        def serverd_running() -> bool:
            c.reload()
            if c.status != "running":
                pytest.fail(f"server container exited: {c.logs().decode()}", pytrace=False)
            _, out = c.exec_run(["pgrep", "-x", "stap-serverd"])
            return bool(out.strip())

        poll("stap-serverd running", serverd_running, 120)
        return (home / ".systemtap" / "rc").read_text()
    finally:
        c.remove(force=True)


@pytest.fixture(scope="module")
def cpus(docker_client: Any, image: str) -> int:
    """The CPU count the entry script sees (getconf in the image)."""
    out = docker_client.containers.run(image, entrypoint=["getconf", "_NPROCESSORS_ONLN"],
                                       remove=True, network_mode="none")
    return int(out.decode().strip())


def _nproc(rc: str) -> int:
    return int(next(w.split("=", 1)[1] for w in rc.split() if w.startswith("--rlimit-nproc=")))


@pytest.fixture(scope="module")
def image(docker_client: Any, server_images: dict[str, str]) -> str:
    return server_images[X86_64.stap]


def test_fresh_home_gets_limits_above_the_parallel_kbuild_threshold(
        docker_client: Any, image: str, cpus: int, tmp_path: Path, test_label: str) -> None:
    rc = _start_with_home(docker_client, image, tmp_path, test_label)
    assert rc == UPSTREAM.format(n=240 * cpus) + "\n"
    assert _nproc(rc) > 30 * cpus


def test_rc_of_earlier_farm_images_is_replaced(docker_client: Any, image: str, cpus: int,
                                               tmp_path: Path, test_label: str) -> None:
    (tmp_path / ".systemtap").mkdir(mode=0o700)
    (tmp_path / ".systemtap" / "rc").write_text(UPSTREAM.format(n=30 * cpus) + "\n")
    rc = _start_with_home(docker_client, image, tmp_path, test_label)
    assert _nproc(rc) == 240 * cpus


@pytest.mark.parametrize("mine", [
    "--rlimit-cpu=120 --rlimit-nproc=30\n",  # the user's own limits, whatever they are
    UPSTREAM.format(n=30) + "\n--rlimit-cpu=90\n",  # upstream's line plus one of the user's
])
def test_rc_the_user_wrote_is_kept(docker_client: Any, image: str, tmp_path: Path,
                                   test_label: str, mine: str) -> None:
    (tmp_path / ".systemtap").mkdir(mode=0o700)
    (tmp_path / ".systemtap" / "rc").write_text(mine)
    assert _start_with_home(docker_client, image, tmp_path, test_label) == mine
