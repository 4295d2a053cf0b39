"""The farm's service containers, as pure specs (keyword arguments of `containers.run`):
the mDNS advertiser, and the endpoint's front door and broker (farm/endpoint/service.py
says who does what). Labelled and hashed like the servers' (farm/engine/specs.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from farm.core import labels
from farm.core.arch import Arch
from farm.core.spec import GlobalConfig
from farm.engine.docker import Mount
from farm.engine.specs import labelled

DOCKER_SOCKET = "/var/run/docker.sock"
CACHE_MOUNT = "/var/cache/stapfarm/modules"
ENDPOINT_MOUNT = "/srv/stapfarm/endpoint"  # STATE_DIR/endpoint (or compose's identity volume)
IDENTITY_MOUNT = f"{ENDPOINT_MOUNT}/identity"
RUN_MOUNT = "/run/stapfarm/broker"
SOCKET = f"{RUN_MOUNT}/broker.sock"
KEY_WORKDIR = "/run/stapfarm/key"  # a private tmpfs of the front door
BROKER_KIND = "endpoint-broker"
# glibc's malloc in the front door: requests of up to 16 MiB come and go; with its dynamic
# mmap threshold they end up in the heap and their pages stay with the process. A fixed
# threshold returns them to the system when freed; few arenas for 64 worker threads.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}


@dataclass(frozen=True)
class Ids:
    """An unprivileged user's uid and gid (the endpoint's front door)."""

    uid: int
    gid: int


def identity_dir(gcfg: GlobalConfig) -> str:
    """Where the farm's identity (certificate database) lives on this host."""
    return os.path.join(gcfg.state_dir, "endpoint", "identity")


def advertiser_name(prefix: str) -> str:
    return f"{prefix}-advertiser"


def frontdoor_name(prefix: str) -> str:
    return f"{prefix}-endpoint"


def broker_name(prefix: str) -> str:
    return f"{prefix}-endpoint-broker"


def cache_volume(prefix: str) -> str:
    return f"{prefix}-modcache"


def run_volume(prefix: str) -> str:
    return f"{prefix}-endpoint-run"


def advertiser_spec(image: str, image_id: str, prefix: str, interfaces: Sequence[str],
                    probe_addr: str, test_label: str = "",
                    docker_socket: str = DOCKER_SOCKET) -> dict[str, Any]:
    """The advertiser: on the host network (mDNS leaves from the host's interfaces with the
    host's addresses), the Docker socket to follow the servers, nothing else."""
    command = ["--prefix", prefix, "--probe-address", probe_addr]
    for i in interfaces:
        command += ["--interface", i]
    spec: dict[str, Any] = {
        "image": image,
        "name": advertiser_name(prefix),
        "command": command,
        "network_mode": "host",
        "mounts": [Mount(DOCKER_SOCKET, docker_socket, type="bind")],
        "restart_policy": {"Name": "unless-stopped"},
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": "128m",
        "pids_limit": 64,
        "stop_signal": "SIGTERM",
    }
    return labelled(spec, "advertiser", prefix, test_label, {}, image_id)


def farm_environment(gcfg: GlobalConfig) -> dict[str, str]:
    """The environment that gives a farm container the same settings as this process: the
    environment stage of the global configuration (docs/cli.md, Environment), written back."""
    env = {"STAPFARM_PREFIX": gcfg.prefix}
    for key, value in (("STAPFARM_TEST_LABEL", gcfg.test_label),
                       ("STAPFARM_HOSTNAME", gcfg.hostname),
                       ("STAPFARM_HOME_VOLUME", gcfg.home_volume),
                       ("STAPFARM_LOG_VOLUME", gcfg.log_volume)):
        if value:
            env[key] = value
    if gcfg.server_ids != (155, 155):
        env["STAPFARM_SERVER_UID"], env["STAPFARM_SERVER_GID"] = map(str, gcfg.server_ids)
    return env


def _config_mounts(config_files: Sequence[str], default_file: str) -> tuple[list[Mount],
                                                                          dict[str, str]]:
    """The global files a container reads (read-only at their host paths) and the variable
    naming the default one (DEFAULT_FILE: STAPFARM_CONFIG_FILE's, or the system's)."""
    mounts = [Mount(os.path.abspath(f), os.path.abspath(f), type="bind", read_only=True)
              for f in config_files]
    env: dict[str, str] = {}
    if default_file:
        path = os.path.abspath(default_file)
        env["STAPFARM_CONFIG_FILE"] = path
        if os.path.exists(path) and path not in {os.path.abspath(f) for f in config_files}:
            mounts.append(Mount(path, path, type="bind", read_only=True))
    return mounts, env


def _offers(gcfg: GlobalConfig) -> list[str]:
    out = []
    for word in gcfg.endpoint_offer:
        arch, _, release = word.partition(":")
        if release:
            out.append(f"{Arch.parse(arch).stap}:{release}")
    return out


def frontdoor_spec(image: str, image_id: str, gcfg: GlobalConfig, ids: Ids, *,
                   provision: bool, config_files: Sequence[str],
                   default_file: str) -> dict[str, Any]:
    """The endpoint's front door: the port clients reach, unprivileged, no Docker socket."""
    command = ["endpoint", "run", "--provision" if provision else "--no-provision"]
    for f in config_files:
        command += ["-c", f]
    prefix = gcfg.prefix
    conf_mounts, env = _config_mounts(config_files, default_file)
    env.update(farm_environment(gcfg), HOME=KEY_WORKDIR, **MALLOC)
    mounts = [Mount(ENDPOINT_MOUNT, os.path.dirname(identity_dir(gcfg)), type="bind",
                    read_only=True),
              Mount(CACHE_MOUNT, cache_volume(prefix), type="volume"),
              Mount(RUN_MOUNT, run_volume(prefix), type="volume", read_only=True),
              *conf_mounts]
    spec: dict[str, Any] = {
        "image": image,
        "name": frontdoor_name(prefix),
        "entrypoint": ["/usr/bin/tini", "--", "python3", "-m", "farm"],
        "command": command,
        "environment": env,
        "user": f"{ids.uid}:{ids.gid}",
        # Clients reach it on the host's port; it reaches the servers' ports on loopback.
        "network_mode": "host",
        "mounts": mounts,
        "restart_policy": {"Name": "unless-stopped"},
        "read_only": True,
        "tmpfs": {KEY_WORKDIR: f"rw,noexec,nosuid,nodev,size=16m,mode=0700,"
                               f"uid={ids.uid},gid={ids.gid}",
                  "/tmp": "rw,noexec,nosuid,nodev,size=16m"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "ipc_mode": "none",
        # ENDPOINT_MEMORY of request bytes, a response per build slot, Python itself.
        "mem_limit": "1g",
        "pids_limit": 128,
        "stop_signal": "SIGTERM",
    }
    extra = {labels.PORT: str(gcfg.endpoint_port),
             f"{labels.PREFIX}.metrics-port": str(gcfg.endpoint_metrics_port)}
    if provision:
        extra[labels.OFFERS] = " ".join(_offers(gcfg))
    return labelled(spec, "endpoint", prefix, gcfg.test_label, extra, image_id)


def broker_spec(image: str, image_id: str, gcfg: GlobalConfig, ids: Ids, *,
                provision: bool, config_files: Sequence[str], default_file: str,
                docker_socket: str = DOCKER_SOCKET) -> dict[str, Any]:
    """The endpoint's broker: the Docker socket, no port; it provisions servers as
    `stap-server start` does (their homes under STATE_DIR, their logs, the host's users)."""
    command = ["endpoint", "broker", "--provision" if provision else "--no-provision",
               "--endpoint-ids", f"{ids.uid}:{ids.gid}"]
    for f in config_files:
        command += ["-c", f]
    prefix = gcfg.prefix
    conf_mounts, env = _config_mounts(config_files, default_file)
    env.update(farm_environment(gcfg))
    log_dir = os.path.dirname(gcfg.log_file)
    mounts = [Mount(DOCKER_SOCKET, docker_socket, type="bind"),
              Mount(RUN_MOUNT, run_volume(prefix), type="volume"),
              Mount(CACHE_MOUNT, cache_volume(prefix), type="volume"),
              Mount(gcfg.state_dir, gcfg.state_dir, type="bind"),
              Mount(log_dir, log_dir, type="bind"),
              Mount("/etc/passwd", "/etc/passwd", type="bind", read_only=True),
              Mount("/etc/group", "/etc/group", type="bind", read_only=True),
              *conf_mounts]
    spec: dict[str, Any] = {
        "image": image,
        "name": broker_name(prefix),
        "entrypoint": ["/usr/bin/tini", "--", "python3", "-m", "farm"],
        "command": command,
        "environment": env,
        # Provisioning waits for new servers' TLS on their published ports (loopback) and
        # downloads kernel trees; nothing listens.
        "network_mode": "host",
        "mounts": mounts,
        "restart_policy": {"Name": "unless-stopped"},
        "read_only": True,
        # /var/tmp: provisioning spools a kernel tree's packages there (farm/kernels).
        "tmpfs": {"/tmp": "rw,noexec,nosuid,size=64m",
                  "/var/tmp": "rw,noexec,nosuid,size=768m"},
        # root without most capabilities: it prepares server homes (as `stap-server start`)
        # and hands the cache and the socket to the front door's user.
        "cap_drop": ["ALL"],
        "cap_add": ["DAC_OVERRIDE", "CHOWN", "FOWNER"],
        "security_opt": ["no-new-privileges"],
        "ipc_mode": "none",
        "mem_limit": "2g",  # tmpfs pages count: /var/tmp holds a tree being provisioned
        "pids_limit": 256,
        "stop_signal": "SIGTERM",
    }
    return labelled(spec, BROKER_KIND, prefix, gcfg.test_label, {}, image_id)
