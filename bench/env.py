"""The bench's own Docker resources: prefix `stapfarmbench`, label org.stapfarm.test=bench-<id>.

Everything the bench creates carries its run's label and is removed at the end, whatever
happened — except the kernel-tree volumes `stapfarmbench-kernels-<debarch>`, which carry the
label org.stapfarm.test=bench-cache and are kept between bench runs so that `--quick` does not
download trees again (`python -m bench --drop-trees` removes them).

The farm itself runs under a prefix of its own per run, `stapfarmbench<id>` (its servers, its
endpoint `stapfarmbench<id>-endpoint`, the endpoint's module cache volume
`stapfarmbench<id>-modcache`), with a per-run copy of the cached trees in
`stapfarmbench<id>-kernels-<debarch>`: an endpoint lists every server of its prefix and its
container name is fixed per prefix, so a shared prefix would route to (or replace) another
farm's servers or endpoint on the same engine.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.core import labels
from farm.core.arch import ARM64, X86_64, Arch
from farm.core.spec import GlobalConfig
from farm.engine import images
from farm.engine.docker import Engine
from farm.engine.trees import TreeStore
from farm.kernels import trees as kernels
from farm.kernels.debian import Mirror
from farm.manual import config
from tests.support import client as tclient
from tests.support.farm import Farm, make_farm
from tests.support.resources import cleanup_label

PREFIX = "stapfarmbench"
CACHE_LABEL = "bench-cache"
MIRROR_CACHE = Path("/var/tmp/stapfarmbench-mirror")
UPSTREAM_KIND = "bench-upstream"


def say(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


@dataclass
class BenchEnv:
    docker: Any
    run_id: str
    root: Path
    gcfg: GlobalConfig
    mirror: Mirror
    releases: dict[str, str] = field(default_factory=dict)  # stap arch -> release
    images: dict[str, str] = field(default_factory=dict)  # image arch (stap) -> tag
    network: Any = None
    client: Any = None
    farm: Farm | None = None
    host: str = ""
    farm_env: dict[str, str] = field(default_factory=dict)
    endpoint_port: int = 0
    endpoint_metrics_port: int = 0

    @property
    def farm_prefix(self) -> str:
        """The prefix of this run's farm (servers, endpoint, its cache volume)."""
        return f"{PREFIX}{self.run_id}"

    @property
    def label(self) -> str:
        return f"bench-{self.run_id}"

    def volume(self, image_arch: Arch) -> str:
        return kernels.volume_name(PREFIX, image_arch)

    def home(self) -> Path:
        """The farm servers' shared home (stap-server user): certificates and stap's cache."""
        return self.root / "state" / "home" / "stap-server"


def create(docker_client: Any) -> BenchEnv:
    run_id = uuid.uuid4().hex[:10]
    root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{run_id}-"))
    os.chmod(root, 0o755)  # the server user (uid 155) must reach its home below
    gfile_src = config.global_file(os.environ)
    base = Path(gfile_src).read_text() if gfile_src and os.path.exists(gfile_src) else ""
    state = root / "state"
    state.mkdir()
    gfile = root / "bench.global"
    ep_port, ep_metrics = _free_port(), _free_port()
    gfile.write_text(base + f"\n# bench: private state, no mDNS\nSTATE_DIR={state}\n"
                     "MDNS_INTERFACES=none\n"
                     f"ENDPOINT_PORT={ep_port}\nENDPOINT_METRICS_PORT={ep_metrics}\n"
                     "ENDPOINT_PROVISION=no\n")
    gcfg = config.load_global([], {config.CONFIG_FILE_ENV: str(gfile)})
    MIRROR_CACHE.mkdir(parents=True, exist_ok=True)
    env = BenchEnv(docker=docker_client, run_id=run_id, root=root, gcfg=gcfg,
                   mirror=Mirror.from_config(gcfg, MIRROR_CACHE),
                   endpoint_port=ep_port, endpoint_metrics_port=ep_metrics)
    env.host = tclient.default_host_names()[0] if tclient.default_host_names() \
        else socket.gethostname()
    farm_env = {k: v for k, v in os.environ.items()
                if k in ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY",
                         "LANG", "TMPDIR")}
    farm_env.update({"STAPFARM_PREFIX": env.farm_prefix, "STAPFARM_TEST_LABEL": env.label,
                     "STAPFARM_HOSTNAME": env.host, config.CONFIG_FILE_ENV: str(gfile)})
    env.farm_env = farm_env
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def require_images(env: BenchEnv, emulated: bool) -> None:
    import docker.errors

    for arch in (X86_64, ARM64) if emulated else (X86_64,):
        tag = images.image_tag(env.gcfg, arch)
        try:
            env.docker.images.get(tag)
        except docker.errors.ImageNotFound as e:
            raise SystemExit(f"bench: server image {tag} is missing: run `make setup`") from e
        env.images[arch.stap] = tag


def _ensure_cache_volume(env: BenchEnv, image_arch: Arch) -> None:
    import docker.errors

    name = env.volume(image_arch)
    try:
        env.docker.volumes.get(name)
    except docker.errors.NotFound:
        env.docker.volumes.create(name, labels={
            labels.OWNER: PREFIX, labels.KIND: "kernels",
            labels.IMAGE_ARCH: image_arch.debian, labels.TEST: CACHE_LABEL})


def ensure_trees(env: BenchEnv, emulated: bool) -> list[dict[str, Any]]:
    """The newest release per target (asked of the mirror), and its trees in the bench's
    cached volumes: (x86_64 image: amd64 native, arm64 cross) and with EMULATED (aarch64
    image: arm64). Returns what was reused or added."""
    suites = env.gcfg.kernel_suites
    for target in (X86_64, ARM64):
        offered = kernels.available(env.mirror, suites, target)
        if not offered:
            raise SystemExit(f"bench: {env.mirror.url} offers no {target.debian} kernel in "
                             f"{' '.join(suites)}")
        env.releases[target.stap] = offered[0]
    wanted = [(X86_64, X86_64), (X86_64, ARM64)] + ([(ARM64, ARM64)] if emulated else [])
    done = []
    for image_arch, target in wanted:
        _ensure_cache_volume(env, image_arch)
        store = TreeStore(Engine(env.docker, PREFIX, env.label), image_arch,
                          env.images[image_arch.stap])
        rel = env.releases[target.stap]
        had = store.get(rel) is not None
        if not had:
            say(f"adding kernel tree {rel} ({target.debian}) to {store.volume} (kept for the "
                "next bench run)")
        store.add(env.mirror, suites, target, rel, say=lambda s: None)
        done.append({"volume": store.volume, "release": rel, "target": target.stap,
                     "reused": had})
    return done


def copy_trees(env: BenchEnv, emulated: bool) -> float:
    """Copy the cached tree volumes into this run's farm's volumes (labelled with the run's
    label, so removed at the end); returns the seconds it took."""
    import time

    t0 = time.monotonic()
    for image_arch in (X86_64, ARM64) if emulated else (X86_64,):
        dst = kernels.volume_name(env.farm_prefix, image_arch)
        env.docker.volumes.create(dst, labels={
            labels.OWNER: env.farm_prefix, labels.KIND: "kernels",
            labels.IMAGE_ARCH: image_arch.debian, labels.TEST: env.label})
        env.docker.containers.run(
            env.images[image_arch.stap], entrypoint=["cp", "-a", "/src/.", "/dst/"], user="0:0",
            network_mode="none", remove=True, platform=image_arch.docker_platform,
            volumes={env.volume(image_arch): {"bind": "/src", "mode": "ro"},
                     dst: {"bind": "/dst", "mode": "rw"}},
            labels={labels.TEST: env.label, labels.OWNER: env.farm_prefix, labels.KIND: "job"})
    return time.monotonic() - t0


def start_client(env: BenchEnv) -> None:
    env.network = env.docker.networks.create(
        f"{PREFIX}-{env.run_id}-net", driver="bridge",
        labels={labels.TEST: env.label, labels.OWNER: PREFIX})
    env.client = tclient.start_client(env.docker, env.network, env.label,
                                      {env.host: "gateway"})
    # make_farm's STATE_DIR is ROOT/state too: one state (home, certificate, cache) per run
    env.farm = make_farm(env.root, env.farm_env,
                         env.client, env.host,
                         {"x86_64": env.releases["x86_64"], "arm64": env.releases["arm64"]})


def cleanup(env: BenchEnv) -> list[str]:
    """Stop the bench's servers and remove everything labelled with this run's label."""
    import docker.errors

    problems: list[str] = []
    if env.farm is not None:
        try:
            rc, out, err = env.farm.run("endpoint", "stop")
            if rc != 0:
                problems.append(f"stap-server endpoint stop: {out}{err}".strip())
        except Exception as e:  # noqa: BLE001 - the label sweep below still runs
            problems.append(f"stap-server endpoint stop: {e}")
        try:
            rc, out, err = env.farm.run("stop")
            if rc != 0:
                problems.append(f"stap-server stop: {out}{err}".strip())
        except Exception as e:  # noqa: BLE001 - the label sweep below still runs
            problems.append(f"stap-server stop: {e}")
    problems += cleanup_label(env.docker, env.label)
    # the endpoint's module cache volume is created by Docker from its mount (no labels);
    # its name is this run's own
    try:
        env.docker.volumes.get(f"{env.farm_prefix}-modcache").remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        problems.append(f"volume {env.farm_prefix}-modcache: {e}")
    shutil.rmtree(env.root, ignore_errors=True)
    return problems


def drop_trees(docker_client: Any) -> list[str]:
    """Remove the bench's cached kernel-tree volumes."""
    removed = []
    for v in docker_client.volumes.list(filters={"label": f"{labels.TEST}={CACHE_LABEL}"}):
        if v.name.startswith(f"{PREFIX}-kernels-"):
            v.remove(force=True)
            removed.append(v.name)
    return removed
