"""Issue: every configured server runs as a container, proven with the real stap client.

Real Docker engine, the farm's images and kernel trees, and the Debian 13 `stap` 5.1 client
in a container on a test network, connecting to the farm by this host's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from farm.core import labels
from farm.core.arch import ARM64, X86_64, Arch
from farm.trust import tls as tlsprobe
from tests.support.client import authorize_cert, default_host_names, start_client
from tests.support.elf import elf_machine, vermagic
from tests.support.farm import Farm, make_farm
from tests.support.trees import KernelTrees

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HELLO = 'probe begin { println("hello"); exit() }'
TRACEPOINT = 'probe kernel.trace("sched:sched_switch") { printf("%d\\n", $next->pid); exit() }'
DWARF = 'probe kernel.function("vfs_read") { printf("%d\\n", $count); exit() }'


@pytest.fixture(scope="module")
def farm(docker_client: Any, kernel_trees: KernelTrees, farm_environ: dict[str, str],
         session_dir: Path, test_network: Any, test_label: str) -> Any:
    for image_arch, target in ((X86_64, X86_64), (X86_64, ARM64), (ARM64, ARM64)):
        kernel_trees.tree(image_arch, target)
    client = start_client(docker_client, test_network, test_label)
    f = make_farm(session_dir / "servers", farm_environ, client, default_host_names()[0],
                  {"x86_64": kernel_trees.release(X86_64), "arm64": kernel_trees.release(ARM64)})
    yield f
    f.run("stop")


def test_start_native_cross_and_configured_emulated(farm: Farm, docker_client: Any) -> None:
    rc, out, err = farm.run("start", "-a", "x86_64", "-r", farm.releases["x86_64"], "-n", "native")
    assert rc == 0, out + err
    assert out.splitlines()[-1].strip() == "OK"
    rc, out, err = farm.run("start", "-a", "aarch64", "-r", farm.releases["arm64"], "-n", "cross")
    assert rc == 0, out + err
    (farm.root / "conf.d" / "emulated.conf").write_text(
        f"ARCH=aarch64\nRELEASE={farm.releases['arm64']}\nSTRATEGY=emulated\nNICKNAME=emu\n")
    rc, out, err = farm.run("start")  # a bare start: every configured server
    assert rc == 0, out + err
    assert "Starting stap-server" in out and "OK" in out

    servers = {s["nickname"]: s for s in farm.status()}
    assert set(servers) == {"native", "cross", "emu"}
    for s in servers.values():
        assert s["state"] == "running" and s["pid"] > 0 and s["port"] > 0
    strategies = {}
    for c in docker_client.containers.list(filters={"label": [
            f"{labels.OWNER}={farm.env['STAPFARM_PREFIX']}", f"{labels.KIND}=server"]}):
        strategies[c.labels[labels.NICKNAME]] = c.labels[labels.STRATEGY]
        assert c.attrs["HostConfig"]["ReadonlyRootfs"] is True
        assert c.attrs["Config"]["User"] != "0:0"
    assert strategies == {"native": "native", "cross": "cross", "emu": "emulated"}
    authorize_cert(farm.client, farm.cert())


@pytest.mark.parametrize("nickname,arch", [("native", X86_64), ("cross", ARM64),
                                           ("emu", ARM64)])
def test_real_client_gets_hello(farm: Farm, nickname: str, arch: Arch) -> None:
    server = farm.server(nickname)
    rc, out, modules = farm.stap(server, ["-m", "hello", "-e", HELLO])
    assert rc == 0, out
    ko = modules["hello.ko"]
    assert elf_machine(ko) == arch.elf_machine
    assert vermagic(ko).split()[0] == server["config"]["releases"][0]


@pytest.mark.parametrize("nickname", ["native", "cross"])
def test_kbuild_runs_in_parallel_on_the_server(farm: Farm, docker_client: Any,
                                              nickname: str) -> None:
    """stap runs kbuild with `make -jCPUS+1` only when its RLIMIT_NPROC (the server home's
    ~/.systemtap/rc) is more than 30 x CPUs; upstream's RPM value (exactly 30 x CPUs) makes
    every compile serial, about twice as slow. The make command comes back in the server's
    stderr with -vv (a script no cache knows, so pass 4 runs)."""
    server = farm.server(nickname)
    c = docker_client.containers.get(server["container"])
    cpus = int(c.exec_run(["getconf", "_NPROCESSORS_ONLN"])[1].decode().strip())
    script = f'probe begin {{ println("parallel {os.urandom(6).hex()}"); exit() }}'
    rc, out, modules = farm.stap(server, ["-vv", "-m", "par", "-e", script])
    assert rc == 0 and "par.ko" in modules, out
    makes = [line.split() for line in out.splitlines() if " make -C " in f" {line}"]
    assert makes, out
    assert all(f"-j{cpus + 1}" in words for words in makes), makes


@pytest.mark.parametrize("nickname", ["native", "cross"])
def test_script_file_with_tapset_dir_and_arguments(farm: Farm, nickname: str) -> None:
    files = {"tapsets/greet.stp": 'function greet(who) { return "greetings, " . who }\n',
             "main.stp": "probe begin { println(greet(@1)); exit() }\n"}
    rc, out, modules = farm.stap(farm.server(nickname),
                                 ["-m", "greet", "-I", "tapsets", "main.stp", "farmer"], files)
    assert rc == 0, out
    # the module names the tapset function's source (for runtime error messages), and the
    # script argument is compiled in as a literal
    assert b"greet.stp:1:" in modules["greet.ko"]  # the client relocates the -I directory
    assert b"farmer" in modules["greet.ko"]


@pytest.mark.parametrize("nickname,arch", [("native", X86_64), ("cross", ARM64)])
def test_tracepoint_through_the_farm(farm: Farm, nickname: str, arch: Arch) -> None:
    rc, out, modules = farm.stap(farm.server(nickname), ["-m", "tp", "-e", TRACEPOINT])
    assert rc == 0, out
    assert elf_machine(modules["tp.ko"]) == arch.elf_machine


@pytest.mark.parametrize("nickname,arch", [("native", X86_64), ("cross", ARM64)])
def test_dwarf_probe_through_the_farm(farm: Farm, nickname: str, arch: Arch) -> None:
    rc, out, modules = farm.stap(farm.server(nickname), ["-m", "dw", "-e", DWARF])
    assert rc == 0, out
    assert elf_machine(modules["dw.ko"]) == arch.elf_machine


def test_status_lines_name_pids_and_the_json_agrees(farm: Farm) -> None:
    rc, out, err = farm.run("status")
    assert rc == 0, out + err
    for s in farm.status():
        assert f'-n "{s["nickname"]}"' in out
        assert f"running as PID {s['pid']}" in out
        assert os.path.exists(f"/proc/{s['pid']}"), "status PIDs are host PIDs"
    stat_files = sorted(p.name for p in (farm.root / "run").iterdir())
    assert stat_files == sorted(f"{s['pid']}.stat" for s in farm.status())


def test_stop_by_pid_stops_exactly_that_server(farm: Farm, docker_client: Any) -> None:
    emu = farm.server("emu")
    rc, out, err = farm.run("stop", "-p", str(emu["pid"]))
    assert rc == 0, out + err
    assert {s["nickname"] for s in farm.status()} == {"native", "cross"}
    import docker.errors
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(emu["container"])


def test_restart_keeps_the_certificate_serial(farm: Farm) -> None:
    before = {s["nickname"]: s for s in farm.status()}
    serial = tlsprobe.probe("127.0.0.1", before["native"]["port"]).get_serial_number()
    rc, out, err = farm.run("restart")
    assert rc == 0, out + err
    after = {s["nickname"]: s for s in farm.status()}
    assert set(after) == {"native", "cross"}
    assert after["native"]["container"] != before["native"]["container"]
    assert tlsprobe.probe("127.0.0.1", after["native"]["port"]).get_serial_number() == serial
    rc, out, _modules = farm.stap(after["cross"], ["-m", "hello", "-e", HELLO])
    assert rc == 0, out


def test_stop_leaves_no_farm_containers(farm: Farm, docker_client: Any) -> None:
    rc, out, err = farm.run("stop")
    assert rc == 0, out + err
    left = docker_client.containers.list(all=True, filters={"label": [
        f"{labels.OWNER}={farm.env['STAPFARM_PREFIX']}", f"{labels.KIND}=server"]})
    assert left == []
    rc, out, err = farm.run("status")
    assert rc == 3
    assert (farm.root / "state/home/stap-server/.systemtap/ssl/server/stap.cert").exists()
