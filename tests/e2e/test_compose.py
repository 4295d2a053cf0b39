"""Issue 7: the lab farm of compose.yaml, with `docker compose` and on a one-node Swarm.

The real Debian 13 `stap` 5.1 client, in a container on the test network, compiles through
servers started by `docker compose -p <test project> up -d` (x86_64 native and aarch64 cross),
then through the same file deployed with `docker stack deploy`. Everything runs under a test
prefix, test ports, test volumes and the session's test label (STAPFARM_* variables of
compose.yaml), so the default lab farm and its volumes are never touched; the kernel volume
is the session's (kernel_trees fixture).
"""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.core import labels
from farm.core.arch import ARM64, X86_64, Arch
from farm.manual.cli import main
from farm.trust import tls as tlsprobe
from tests.support.client import (
    REPO,
    authorize_cert,
    client_stap,
    default_host_names,
    start_client,
)
from tests.support.elf import elf_machine, vermagic
from tests.support.farm import Farm, make_farm
from tests.support.mdns_browser import Browser
from tests.support.poll import poll as wait_for
from tests.support.poll import wait_until
from tests.support.trees import KernelTrees

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HELLO = 'probe begin { println("hello"); exit() }'
READY = 180.0  # seconds for a server to answer TLS after `up` / `deploy`
SERVICE_TYPE = "_stap._tcp.local."


def run(args: list[str], env: dict[str, str], check: bool = True,
        timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    return proc


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("0.0.0.0", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def answers_tls(port: int) -> bool:
    try:
        tlsprobe.probe("127.0.0.1", port, timeout=3.0)
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def served_cert(port: int) -> bytes:
    from OpenSSL import crypto

    return bytes(crypto.dump_certificate(crypto.FILETYPE_ASN1,
                                         tlsprobe.probe("127.0.0.1", port, timeout=5.0)))


def farm_env(kernel_trees: KernelTrees, prefix: str, test_label: str, name: str,
             gateway: str) -> dict[str, str]:
    """compose.yaml's variables for a test farm named NAME under PREFIX."""
    x86_port, arm_port, ep_port, metrics_port = free_ports(4)
    env = dict(os.environ)
    env.update({
        "STAPFARM_PREFIX": prefix, "STAPFARM_TEST_LABEL": test_label,
        "STAPFARM_RELEASE_X86_64": kernel_trees.release(X86_64),
        "STAPFARM_RELEASE_ARM64": kernel_trees.release(ARM64),
        "STAPFARM_X86_64_PORT": str(x86_port), "STAPFARM_AARCH64_PORT": str(arm_port),
        "STAPFARM_ENDPOINT_PORT": str(ep_port), "STAPFARM_ENDPOINT_METRICS_PORT":
            str(metrics_port),
        "STAPFARM_KERNELS_VOLUME": kernel_trees.volume(X86_64),
        "STAPFARM_KERNELS_VOLUME_ARM64": kernel_trees.volume(ARM64),
        "STAPFARM_HOME_VOLUME": f"{prefix}-{name}-home",
        "STAPFARM_LOG_VOLUME": f"{prefix}-{name}-log",
        "STAPFARM_HOSTNAME": default_host_names()[0],
        "STAPFARM_MDNS_INTERFACES": gateway,  # only the test bridge, never the host's LAN
    })
    env.pop("COMPOSE_PROJECT_NAME", None)
    env.pop("COMPOSE_FILE", None)
    return env


def remove_volumes(docker_client: Any, names: list[str]) -> None:
    import docker.errors

    for name in names:
        try:
            docker_client.volumes.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass


def compile_hello(client: Any, host: str, port: int, target: Arch, release: str) -> None:
    rc, out, modules = client_stap(client, [f"--use-server={host}:{port}", "-a", target.stap,
                                            "-r", release, "-p4", "-m", "hello", "-e", HELLO])
    assert rc == 0, out
    ko = modules["hello.ko"]
    assert elf_machine(ko) == target.elf_machine
    assert vermagic(ko).split()[0] == release


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trees(kernel_trees: KernelTrees) -> KernelTrees:
    for target in (X86_64, ARM64):
        kernel_trees.tree(X86_64, target)  # the x86_64 image's volume: native + cross
    return kernel_trees


@pytest.fixture(scope="module")
def client(docker_client: Any, test_network: Any, test_label: str) -> Any:
    c = start_client(docker_client, test_network, test_label)
    yield c
    c.remove(force=True)


@pytest.fixture(scope="module")
def advertiser_image(docker_client: Any) -> str:
    """The service image (farm/engine/images.py builds it when its inputs change)."""
    from farm.engine import images
    from farm.engine.docker import Engine
    from farm.manual import config

    gcfg = config.load_global([], os.environ)
    images.ensure_service_image(Engine(docker_client), gcfg)
    return images.service_tag(gcfg)


@pytest.fixture(scope="module")
def compose_farm(docker_client: Any, trees: KernelTrees, test_prefix: str, test_label: str,
                 gateway: str, advertiser_image: str) -> Iterator[dict[str, Any]]:
    """`docker compose -p <test project> up -d` of the repository's compose files."""
    prefix = f"{test_prefix}c"
    env = farm_env(trees, prefix, test_label, "compose", gateway)
    project = f"{prefix}-compose"
    up = ["docker", "compose", "-p", project]
    try:
        t0 = time.monotonic()
        run(up + ["up", "-d"], env)
        for var in ("STAPFARM_X86_64_PORT", "STAPFARM_AARCH64_PORT", "STAPFARM_ENDPOINT_PORT"):
            wait_for(f"TLS on {env[var]}", functools.partial(answers_tls, int(env[var])), READY)
        yield {"env": env, "project": project, "prefix": prefix, "up": up,
               "started_in": time.monotonic() - t0}
    finally:
        run(up + ["down", "-v", "--remove-orphans"], env, check=False)
        remove_volumes(docker_client, [env["STAPFARM_HOME_VOLUME"], env["STAPFARM_LOG_VOLUME"]])


@pytest.fixture(scope="module")
def status_farm(compose_farm: dict[str, Any], farm_environ: dict[str, str], session_dir: Path,
                client: Any, trees: KernelTrees) -> Farm:
    """`stap-server` (farm.manual.cli.main) with the compose farm's prefix and private paths."""
    environ = dict(farm_environ, STAPFARM_PREFIX=compose_farm["prefix"])
    return make_farm(session_dir / "compose", environ, client, default_host_names()[0],
                     {"x86_64": trees.release(X86_64), "arm64": trees.release(ARM64)})


# --------------------------------------------------------------------------- compose


def test_compose_servers_carry_the_cli_labels_and_hardening(compose_farm: dict[str, Any],
                                                           docker_client: Any) -> None:
    env = compose_farm["env"]
    found = {}
    for c in docker_client.containers.list(filters={"label": [
            f"{labels.OWNER}={compose_farm['prefix']}", f"{labels.KIND}=server"]}):
        lab = c.labels
        found[lab[labels.NICKNAME]] = lab
        assert lab[labels.TEST] == env["STAPFARM_TEST_LABEL"]
        cfg = json.loads(lab[labels.CONFIG])
        assert cfg["port"] == int(lab[labels.PORT]) and cfg["nickname"] == lab[labels.NICKNAME]
        host = c.attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["PidsLimit"] == 512 and host["Memory"] == 2 * 1024 ** 3
        assert c.attrs["Config"]["User"] == "155:155"
        kernels = [m for m in c.attrs["Mounts"] if m["Destination"] == "/srv/stapfarm/kernels"]
        assert kernels and kernels[0]["Name"] == env["STAPFARM_KERNELS_VOLUME"]
        assert kernels[0]["RW"] is False
    assert set(found) == {"x86_64", "aarch64"}
    assert found["x86_64"][labels.STRATEGY] == "native"
    assert found["aarch64"][labels.STRATEGY] == "cross"
    assert found["x86_64"][labels.RELEASES] == env["STAPFARM_RELEASE_X86_64"]
    assert found["aarch64"][labels.RELEASES] == env["STAPFARM_RELEASE_ARM64"]
    for v in (env["STAPFARM_HOME_VOLUME"], env["STAPFARM_LOG_VOLUME"]):
        assert docker_client.volumes.get(v).attrs["Labels"][labels.TEST] == \
            env["STAPFARM_TEST_LABEL"]


def test_compose_servers_appear_in_stap_server_status(compose_farm: dict[str, Any],
                                                     status_farm: Farm) -> None:
    env = compose_farm["env"]
    servers = {s["nickname"]: s for s in status_farm.status()}
    assert set(servers) == {"x86_64", "aarch64"}
    assert servers["x86_64"]["port"] == int(env["STAPFARM_X86_64_PORT"])
    assert servers["aarch64"]["port"] == int(env["STAPFARM_AARCH64_PORT"])
    for s in servers.values():
        assert s["state"] == "running" and s["pid"] > 0
    rc, out, err = status_farm.run("status")
    assert rc == 0, out + err
    assert '-n "aarch64"' in out and f'--port "{env["STAPFARM_AARCH64_PORT"]}"' in out


def test_compose_farm_is_advertised_through_its_endpoint(compose_farm: dict[str, Any],
                                                        gateway: str) -> None:
    """With the endpoint up, the advertiser publishes it (once per target), not the servers."""
    env = compose_farm["env"]
    endpoint = int(env["STAPFARM_ENDPOINT_PORT"])
    browser = Browser(gateway)
    try:
        wait_for(f"mDNS services of the endpoint (port {endpoint}) only",
                 lambda: sorted(browser.ports().values()) == [endpoint, endpoint], 60)
    finally:
        browser.close()


def _trust_bundle(status_farm: Farm, client: Any, directory: Path, *args: str) -> None:
    """`stap-server trust --export DIR ARGS`, then the exported script run as alice."""
    rc, out, err = status_farm.run("trust", "--export", str(directory), *args)
    assert rc == 0, out + err
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(directory), arcname=directory.name)
    assert client.put_archive("/home/alice", buf.getvalue())
    code, output = client.exec_run(["chown", "-R", "alice:", f"/home/alice/{directory.name}"])
    assert code == 0, output.decode()
    code, output = client.exec_run(["sh", f"/home/alice/{directory.name}/trust-farm.sh"],
                                   user="alice", environment={"HOME": "/home/alice"})
    assert code == 0, output.decode()


def test_real_client_compiles_through_compose_farm(compose_farm: dict[str, Any],
                                                   status_farm: Farm, client: Any,
                                                   tmp_path: Path, trees: KernelTrees) -> None:
    """The trust step `make up` prints (trust --export + trust-farm.sh): the farm's identity,
    i.e. the endpoint, compiles both targets at one address. The servers behind it are
    trusted only when named (their keys are readable by compiles on them)."""
    env = compose_farm["env"]
    host = env["STAPFARM_HOSTNAME"]
    _trust_bundle(status_farm, client, tmp_path / "stapfarm-trust")
    for target in (X86_64, ARM64):
        compile_hello(client, host, int(env["STAPFARM_ENDPOINT_PORT"]), target,
                      trees.release(target))
    rc, out, _ = client_stap(client, [f"--use-server={host}:{env['STAPFARM_X86_64_PORT']}",
                                      "-a", "x86_64", "-r", trees.release(X86_64), "-p4",
                                      "-e", HELLO])
    assert rc != 0, out  # a server's own certificate is not the farm's
    _trust_bundle(status_farm, client, tmp_path / "servers-trust", "-n", "x86_64",
                  "-n", "aarch64")
    compile_hello(client, host, int(env["STAPFARM_X86_64_PORT"]), X86_64,
                  trees.release(X86_64))
    compile_hello(client, host, int(env["STAPFARM_AARCH64_PORT"]), ARM64,
                  trees.release(ARM64))


def test_compose_down_leaves_no_farm_containers_and_keeps_volumes(
        compose_farm: dict[str, Any], docker_client: Any) -> None:
    env, project = compose_farm["env"], compose_farm["project"]
    run(compose_farm["up"] + ["down"], env)
    left = docker_client.containers.list(all=True, filters={"label": [
        f"com.docker.compose.project={project}"]})
    left += docker_client.containers.list(all=True, filters={"label": [
        f"{labels.OWNER}={compose_farm['prefix']}"]})
    assert not left, [c.name for c in left]
    for v in (env["STAPFARM_HOME_VOLUME"], env["STAPFARM_LOG_VOLUME"]):
        docker_client.volumes.get(v)  # kept without -v
    run(compose_farm["up"] + ["down", "-v"], env)
    import docker.errors
    for v in (env["STAPFARM_HOME_VOLUME"], env["STAPFARM_LOG_VOLUME"]):
        with pytest.raises(docker.errors.NotFound):
            docker_client.volumes.get(v)


def test_configured_servers_become_a_compose_farm_that_serves_the_real_client(
        docker_client: Any, trees: KernelTrees, test_prefix: str, test_label: str,
        gateway: str, advertiser_image: str, client: Any, farm_environ: dict[str, str],
        tmp_path: Path) -> None:
    # `stap-server compose` of a .conf: the server start would run, as a compose service
    prefix = f"{test_prefix}g"
    env = farm_env(trees, prefix, test_label, "configured", gateway)
    rel = trees.release(X86_64)
    port = free_ports(1)[0]
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (conf_d / "build.conf").write_text(f"ARCH=x86_64\nRELEASE={rel}\nNICKNAME=build\n"
                                       f"PORT={port}\n")
    gfile = tmp_path / "global"
    gfile.write_text(Path(farm_environ["STAPFARM_CONFIG_FILE"]).read_text()
                     + f"\nCONFIG_PATH={conf_d}\n")
    out_dir = tmp_path / "farm"
    out_dir.mkdir()
    out, err = io.StringIO(), io.StringIO()
    rc = main(["compose", "-o", str(out_dir)],
              environ=dict(farm_environ, STAPFARM_CONFIG_FILE=str(gfile)), stdout=out,
              stderr=err)
    assert rc == 0, err.getvalue()
    up = ["docker", "compose", "-p", f"{prefix}-configured"]
    try:
        run(up + ["up", "-d"], env, cwd=out_dir)
        wait_for(f"TLS on {port}", functools.partial(answers_tls, port), READY)
        authorize_cert(client, served_cert(port))  # a new farm: its own certificate database
        compile_hello(client, default_host_names()[0], port, X86_64, rel)
        (server,) = docker_client.containers.list(filters={"label": [
            f"{labels.OWNER}={prefix}", f"{labels.KIND}=server"]})
        assert server.labels[labels.NICKNAME] == "build"
        assert json.loads(server.labels[labels.CONFIG])["source"] == str(conf_d / "build.conf")
    finally:
        run(up + ["down", "-v", "--remove-orphans"], env, check=False, cwd=out_dir)
        remove_volumes(docker_client, [env["STAPFARM_HOME_VOLUME"], env["STAPFARM_LOG_VOLUME"]])


# --------------------------------------------------------------------------- swarm


@pytest.fixture(scope="module")
def swarm(docker_client: Any) -> Iterator[None]:
    """A one-node Swarm on loopback, created here and left (`--force`) afterwards."""
    state = docker_client.info().get("Swarm", {}).get("LocalNodeState", "")
    if state not in ("inactive", ""):
        pytest.skip(f"this engine is already a Swarm node ({state}); the test only uses a "
                    "Swarm it creates")
    had_gwbridge = bool(docker_client.networks.list(names=["docker_gwbridge"]))
    init = subprocess.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1",
                           "--listen-addr", "127.0.0.1:2377"], capture_output=True, text=True,
                          check=False)
    if init.returncode != 0:
        pytest.skip(f"this engine cannot create a Swarm: {init.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True, check=False)
        if not had_gwbridge:
            import docker.errors
            for n in docker_client.networks.list(names=["docker_gwbridge"]):
                try:
                    # engine 20.10 leaves the routing mesh's sandbox attached after `leave`
                    n.disconnect("gateway_ingress-sbox", force=True)
                except docker.errors.APIError:
                    pass
                try:
                    n.remove()
                except docker.errors.APIError:
                    pass  # in use by something else: not ours to force


@pytest.fixture(scope="module")
def stack(swarm: None, docker_client: Any, trees: KernelTrees, test_prefix: str,
          test_label: str, gateway: str, advertiser_image: str) -> Iterator[dict[str, Any]]:
    """`docker stack deploy -c compose.yaml` (this module's last test: the compose farm is
    down by then)."""
    prefix = f"{test_prefix}s"
    env = farm_env(trees, prefix, test_label, "swarm", gateway)
    name = f"{prefix}-stack"
    try:
        deploy = run(["docker", "stack", "deploy", "-c", "compose.yaml", name], env)
        for var in ("STAPFARM_X86_64_PORT", "STAPFARM_AARCH64_PORT", "STAPFARM_ENDPOINT_PORT"):
            wait_for(f"TLS on {env[var]} (stack)", functools.partial(answers_tls, int(env[var])),
                     READY)
        yield {"env": env, "name": name, "prefix": prefix, "deploy_output": deploy.stderr}
    finally:
        subprocess.run(["docker", "stack", "rm", name], capture_output=True, check=False)
        import docker.errors
        flt = {"label": [f"com.docker.stack.namespace={name}"]}
        # sparse: no per-container inspect, which races the stack's own removal (404)
        wait_until(lambda: not docker_client.containers.list(all=True, filters=flt,
                                                              sparse=True), 120, 0.5)
        for c in docker_client.containers.list(all=True, filters=flt, sparse=True):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass  # removed by the stack meanwhile
        remove_volumes(docker_client, [env["STAPFARM_HOME_VOLUME"], env["STAPFARM_LOG_VOLUME"]])


def test_stack_deploy_serves_the_real_client(stack: dict[str, Any], client: Any,
                                             docker_client: Any, farm_environ: dict[str, str],
                                             session_dir: Path, trees: KernelTrees) -> None:
    env = stack["env"]
    # what swarm mode on this engine does not take (README "Lab farm and scale-out")
    assert "security_opt" in stack["deploy_output"]
    servers = docker_client.containers.list(filters={"label": [
        f"{labels.OWNER}={stack['prefix']}", f"{labels.KIND}=server"]})
    assert {c.labels[labels.NICKNAME] for c in servers} == {"x86_64", "aarch64"}
    for c in servers:
        assert c.attrs["HostConfig"]["CapDrop"] == ["ALL"]
        assert c.attrs["HostConfig"]["ReadonlyRootfs"] is True
        assert c.attrs["HostConfig"]["PidsLimit"] == 512
    f = make_farm(session_dir / "stack", dict(farm_environ, STAPFARM_PREFIX=stack["prefix"]),
                  client, env["STAPFARM_HOSTNAME"], {})
    assert {s["nickname"] for s in f.status() if s["state"] == "running"} == \
        {"x86_64", "aarch64"}
    port = int(env["STAPFARM_AARCH64_PORT"])
    authorize_cert(client, served_cert(port))
    compile_hello(client, env["STAPFARM_HOSTNAME"], port, ARM64, trees.release(ARM64))
