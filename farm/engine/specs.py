"""Container specs, pure: a server's (`server_spec`) here, the farm's services' in
farm/engine/service_specs.py; each is the keyword arguments of `containers.run`, tested by
equality, labelled with the farm's labels and a hash of everything that defines it (what a
restart compares). compose.yaml is generated from the same functions: farm/engine/compose.py
translates their specs, farm/manual/compose_lab.py calls them for the lab farm.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from docker.types import Healthcheck, Mount

from farm.core import labels
from farm.core.spec import GlobalConfig, ServerConfig
from farm.core.strategy import BuildPlan
from farm.kernels.trees import MOUNT as KERNELS_MOUNT

HOME = "/home/stap-server"  # the image's server home; HOME of the daemon
LOG = "/var/log/stapfarm/server.log"  # where the host's LOG file is mounted
SSL = "/srv/stapfarm/ssl"  # where an explicit SSL (--ssl) directory is mounted
TMP = "/tmp"  # TMPDIR: must match ^[-/._0-9a-z]+$ (stap-protocol.md §6.10)
DAEMON = "stap-serverd"


@dataclass(frozen=True)
class Placement:
    """What the backend found on the host for one server (all host paths absolute)."""

    image: str
    kernels_volume: str
    uid: int
    gid: int
    home_dir: str  # host directory (or volume name) mounted as HOME (cert DB, cache, rc)
    log_file: str  # host file mounted at LOG (or a volume name mounted at LOG's directory)
    port: int  # published host port (the daemon listens on the same port)
    hostname: str
    prefix: str
    test_label: str = ""


def config_to_json(cfg: ServerConfig) -> str:
    """CFG as its `org.stapfarm.config` label (ServerConfig.to_dict, sorted keys)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_json(text: str) -> ServerConfig:
    """The configuration of an `org.stapfarm.config` label.

    Raises:
        ValueError, TypeError, KeyError: not one.
    """
    d = json.loads(text)
    if not isinstance(d, dict):
        raise TypeError("not a configuration object")
    return ServerConfig.from_dict(d)


def daemon_args(cfg: ServerConfig, plan: BuildPlan, port: int) -> list[str]:
    """stap-serverd's command line for CFG, in upstream's option order."""
    args = ["-a", plan.target.stap]
    for rel in cfg.releases:
        args += ["-r", rel]
    builds = list(cfg.build)
    if plan.cross_compile and not any("CROSS_COMPILE=" in b for b in builds):
        builds.append(f"CROSS_COMPILE={plan.cross_compile}")
    for b in builds:
        args += ["-B", b]
    for i in cfg.include:
        args += ["-I", i]
    for d in cfg.define:
        args += ["-D", d]
    if cfg.runtime:
        args += ["-R", cfg.runtime]
    args += [f"--log={LOG}", "--port", str(port)]
    if cfg.ssl:
        args += ["--ssl", SSL]
    if cfg.max_threads is not None:
        args += ["--max-threads", str(cfg.max_threads)]
    if cfg.max_request_size is not None:
        args += ["--max-request-size", str(cfg.max_request_size)]
    if cfg.max_compressed_request is not None:
        args += ["--max-compressed-request", str(cfg.max_compressed_request)]
    return args


def server_spec(cfg: ServerConfig, plan: BuildPlan, where: Placement,
                gcfg: GlobalConfig) -> dict[str, Any]:
    """Keyword arguments for `containers.run(detach=True, **spec)`: the server CFG."""
    mounts = [
        Mount(KERNELS_MOUNT, where.kernels_volume, type="volume", read_only=True),
        # Host paths are bound; names are volumes (a compose farm's home and log volumes).
        Mount(HOME, where.home_dir, type="bind" if where.home_dir.startswith("/") else "volume"),
        Mount(LOG, where.log_file, type="bind") if where.log_file.startswith("/")
        else Mount(os.path.dirname(LOG), where.log_file, type="volume"),
    ]
    if cfg.ssl:
        mounts.append(Mount(SSL, cfg.ssl, type="bind"))
    ro_paths = [r for r in cfg.releases if r.startswith("/")] + list(cfg.include)
    if cfg.runtime:
        ro_paths.append(cfg.runtime)
    for path in dict.fromkeys(ro_paths):
        mounts.append(Mount(path, path, type="bind", read_only=True))
    spec: dict[str, Any] = {
        "image": where.image,
        "command": daemon_args(cfg, plan, where.port),
        "user": f"{where.uid}:{where.gid}",
        "environment": {"HOME": HOME, "TMPDIR": TMP, "DEBUGINFOD_URLS": ""},
        "hostname": where.hostname,
        "mounts": mounts,
        "tmpfs": {TMP: f"rw,nosuid,nodev,noexec,size={gcfg.tmpfs_size},mode=1777"},
        "ports": {f"{where.port}/tcp": (gcfg.listen_address, where.port)},
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": gcfg.memory_limit,
        "pids_limit": gcfg.pids_limit,
        "restart_policy": {"Name": "unless-stopped"},
        "ipc_mode": "none",  # no /dev/shm: nothing in a compile needs System V/POSIX IPC
        # Upstream has no per-connection timeout: held workers make a server unresponsive
        # while its process lives; the health check makes that visible (docker ps, status).
        "healthcheck": Healthcheck(
            test=["CMD", "sh", "-c", ("printf '\\0\\0\\0\\0' | timeout 5 openssl s_client "
                  f"-quiet -connect 127.0.0.1:{where.port} >/dev/null 2>&1")],
            interval=30_000_000_000, timeout=10_000_000_000, retries=3,
            start_period=60_000_000_000),
        "platform": plan.image_arch.docker_platform,
    }
    if gcfg.cpus:
        spec["nano_cpus"] = int(gcfg.cpus * 1e9)
    spec = labelled(spec, "server", where.prefix, where.test_label, {
        labels.CONFIG: config_to_json(cfg),
        labels.NICKNAME: cfg.nickname,
        labels.PORT: str(where.port),
        labels.RELEASES: " ".join(cfg.releases),
        labels.STRATEGY: plan.strategy.value,
        labels.IMAGE_ARCH: plan.image_arch.debian,
    })
    spec["name"] = f"{where.prefix}-{plan.target.machine}-{spec['labels'][labels.SPEC_HASH][:10]}"
    return spec


def labelled(spec: dict[str, Any], kind: str, prefix: str, test_label: str,
             extra: dict[str, str], image_id: str = "") -> dict[str, Any]:
    """SPEC with the farm's labels: owner, kind, the test's label, EXTRA, and the hash of
    SPEC (and IMAGE_ID: a rebuilt image under the same tag is another container)."""
    body = dict(spec)
    if image_id:
        body["image_id"] = image_id
    out = dict(spec)
    out["labels"] = {labels.OWNER: prefix, labels.KIND: kind,
                     labels.SPEC_HASH: spec_hash(body), **extra}
    if test_label:
        out["labels"][labels.TEST] = test_label
    return out


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable hash of everything that defines the container (labels and name excluded)."""
    def norm(v: Any) -> Any:
        if isinstance(v, Mount):
            return dict(sorted(v.items()))
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v
    body = {k: norm(v) for k, v in spec.items() if k not in ("labels", "name")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
