"""The farm endpoint as a service: its two containers, its identity, its foreground runs.

    stap-server endpoint start [--provision|--no-provision]  # ensure_endpoint(...)
    stap-server endpoint stop                                # stop_endpoint(...)
    stap-server endpoint run                                 # run_frontdoor(...): container 1
    stap-server endpoint broker                              # run_broker(...): container 2

Least privilege, by container (both from the farm's service image):

- `<prefix>-endpoint`, the **front door**: the TLS port clients reach. Runs as ENDPOINT_USER
  (never root), no capabilities, no Docker socket, read-only root; it mounts the farm's
  identity read-only, the module cache, and the broker's socket directory. Host network:
  it listens on the host's ENDPOINT_PORT and reaches the servers' published ports on
  loopback.
- `<prefix>-endpoint-broker`, the **broker** (farm/endpoint/broker.py): root with the Docker
  socket (root-equivalent, as the advertiser), no listening port; it answers the front door
  on a Unix socket (mode 0660, ENDPOINT_USER's group) in the volume `<prefix>-endpoint-run`.

The identity (farm/endpoint/identity.py) is `STATE_DIR/endpoint/identity`, created once with
upstream's `stap-gen-cert` for the host's names, owned by ENDPOINT_USER, mode 0700. No compile
server mounts it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pwd
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from docker.types import Mount
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from farm.core import labels
from farm.core.arch import Arch
from farm.core.errors import ConfigError, FarmError, ServerError
from farm.core.spec import (
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_REQUEST_SIZE,
    GlobalConfig,
)
from farm.discovery.advertiser import probe_address
from farm.endpoint.broker import Broker, DockerEngine
from farm.endpoint.broker_client import BrokerDirectory
from farm.endpoint.identity import Signer, exported_identity
from farm.endpoint.modcache import ModuleCache
from farm.endpoint.policy import Policy
from farm.endpoint.server import Endpoint, Settings
from farm.engine.advertiser import ensure_image, image_tag
from farm.engine.docker import connect, still_running
from farm.engine.servers import DockerBackend
from farm.trust import tls as tlsprobe

log = logging.getLogger("stapfarm.endpoint")

CACHE_MOUNT = "/var/cache/stapfarm/modules"
ENDPOINT_MOUNT = "/srv/stapfarm/endpoint"  # STATE_DIR/endpoint (or compose's identity volume)
IDENTITY_MOUNT = f"{ENDPOINT_MOUNT}/identity"
RUN_MOUNT = "/run/stapfarm/broker"
SOCKET = f"{RUN_MOUNT}/broker.sock"
KEY_WORKDIR = "/run/stapfarm/key"  # a private tmpfs of the front door
DOCKER_SOCKET = "/var/run/docker.sock"
BROKER_KIND = "endpoint-broker"
_SIZE = re.compile(r"([0-9]+)([bkmg]?)")


def parse_size(text: str) -> int:
    """`4g` → bytes (b, k, m, g suffixes, as MEMORY_LIMIT).

    Raises:
        ValueError: not a size.
    """
    m = _SIZE.fullmatch(text.strip().lower())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def identity_dir(gcfg: GlobalConfig) -> str:
    """Where the farm's identity (certificate database) lives on this host."""
    return os.path.join(gcfg.state_dir, "endpoint", "identity")


@dataclass(frozen=True)
class Ids:
    """The front door's user: ENDPOINT_USER's uid and gid on this host."""

    uid: int
    gid: int

    @classmethod
    def of(cls, gcfg: GlobalConfig) -> Ids:
        """Raises:
            ServerError: ENDPOINT_USER does not exist or is root.
        """
        try:
            pw = pwd.getpwnam(gcfg.endpoint_user)
        except KeyError as e:
            raise ServerError(f"the endpoint's user '{gcfg.endpoint_user}' does not exist on "
                              "this host", hint="`make setup` creates stap-endpoint; or set "
                                                "ENDPOINT_USER") from e
        if pw.pw_uid == 0:
            raise ServerError("the endpoint's front door never runs as root",
                              hint="set ENDPOINT_USER to an unprivileged user")
        return cls(pw.pw_uid, pw.pw_gid)


def settings_of(gcfg: GlobalConfig, cert: str, key: str, version: str) -> Settings:
    """The front door's Settings from the global configuration."""
    return Settings(listen=gcfg.listen_address, port=gcfg.endpoint_port, cert_file=cert,
                    key_file=key, max_compressed=DEFAULT_MAX_COMPRESSED_REQUEST,
                    max_uncompressed=DEFAULT_MAX_REQUEST_SIZE,
                    idle_timeout=float(gcfg.endpoint_idle_timeout),
                    write_timeout=float(gcfg.endpoint_write_timeout),
                    queue_timeout=float(gcfg.endpoint_queue_timeout),
                    max_connections=gcfg.endpoint_max_connections,
                    max_per_source=gcfg.endpoint_max_per_source,
                    max_queue=gcfg.endpoint_max_queue,
                    memory=max(parse_size(gcfg.endpoint_memory), DEFAULT_MAX_COMPRESSED_REQUEST),
                    max_response=parse_size(gcfg.endpoint_max_response),
                    server_version=version, policy=Policy.parse(gcfg.endpoint_policy))


# --------------------------------------------------------------------------- foreground


def _serve_until_signalled(main: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any]],
                           stop: threading.Event | None) -> None:
    loop = asyncio.new_event_loop()
    task = main(loop)
    if stop is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
    else:
        threading.Thread(target=lambda: (stop.wait(), loop.call_soon_threadsafe(task.cancel)),
                         daemon=True).start()
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        log.info("farm endpoint stopping")
    finally:
        loop.close()


def run_frontdoor(gcfg: GlobalConfig, *, provision: bool, identity: str = IDENTITY_MOUNT,
                  cache_dir: str = CACHE_MOUNT, broker: str = SOCKET,
                  workdir: str = KEY_WORKDIR, stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or STOP): what the front door's container runs.

    Raises:
        FarmError: no identity, no broker within a minute, or the port is taken.
    """
    if os.geteuid() == 0:
        raise ServerError("the endpoint's front door refuses to run as root",
                          hint="run it as ENDPOINT_USER (stap-server endpoint start does)")
    directory = BrokerDirectory(broker)
    version = ""
    deadline = time.monotonic() + 60
    while not version:
        try:
            version = directory.hello()
        except FarmError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    cache = ModuleCache(cache_dir, parse_size(gcfg.endpoint_cache_size))
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    with exported_identity(identity, workdir) as (cert, key):
        signer = Signer.load(key)
        settings = settings_of(gcfg, cert, key, version)
        endpoint = Endpoint(settings, directory, cache, directory if provision else None,
                            signer.sign)
    if gcfg.endpoint_metrics_port:
        start_http_server(gcfg.endpoint_metrics_port, gcfg.endpoint_metrics_address,
                          registry=endpoint.metrics.registry)
    try:
        _serve_until_signalled(lambda loop: loop.create_task(endpoint.serve()), stop)
    except OSError as e:
        raise ServerError(f"the endpoint cannot listen on port {gcfg.endpoint_port}: "
                          f"{e.strerror or e}", hint="set ENDPOINT_PORT") from e


def run_broker(gcfg: GlobalConfig, environ: Mapping[str, str], *, provision: bool,
               ids: Ids, socket_path: str = SOCKET, cache_dir: str = CACHE_MOUNT,
               stop: threading.Event | None = None) -> None:
    """Answer the front door until SIGTERM/SIGINT (or STOP): the broker's container.

    Raises:
        FarmError: Docker is unreachable.
    """
    client = connect(environ)
    prefix = environ.get("STAPFARM_PREFIX", "stapfarm")
    for path, mode in ((os.path.dirname(socket_path), 0o750), (cache_dir, 0o700)):
        if os.path.isdir(path) and os.geteuid() == 0:
            os.chown(path, 0 if path != cache_dir else ids.uid, ids.gid)
            os.chmod(path, mode)
            if path == cache_dir:  # a cache the old root endpoint wrote
                for root, dirs, files in os.walk(path):
                    for name in dirs + files:
                        os.lchown(os.path.join(root, name), ids.uid, ids.gid)
    engine = DockerEngine(client, prefix, gcfg, environ,
                          host=probe_address(gcfg.listen_address))
    broker = Broker(engine, offer=gcfg.endpoint_offer, provision_enabled=provision,
                    max_provisioned=gcfg.endpoint_max_provisioned,
                    idle=float(gcfg.endpoint_provision_idle))
    stopping = stop or threading.Event()
    if stop is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
    broker.serve(socket_path, group=ids.gid, stop=stopping)


# --------------------------------------------------------------------------- containers


def container_name(prefix: str) -> str:
    return f"{prefix}-endpoint"


def broker_name(prefix: str) -> str:
    return f"{prefix}-endpoint-broker"


def cache_volume(prefix: str) -> str:
    return f"{prefix}-modcache"


def run_volume(prefix: str) -> str:
    return f"{prefix}-endpoint-run"


def _config_mounts(config_files: list[str], environ: Mapping[str, str]
                   ) -> tuple[list[Mount], dict[str, str]]:
    """The global files the containers read (mounted read-only at their host paths)."""
    mounts = [Mount(os.path.abspath(f), os.path.abspath(f), type="bind", read_only=True)
              for f in config_files]
    env = {k: environ[k] for k in ("STAPFARM_PREFIX", "STAPFARM_TEST_LABEL", "STAPFARM_HOSTNAME")
           if environ.get(k)}
    if environ.get("STAPFARM_CONFIG_FILE"):
        path = os.path.abspath(environ["STAPFARM_CONFIG_FILE"])
        env["STAPFARM_CONFIG_FILE"] = path
        if os.path.exists(path) and path not in {os.path.abspath(f) for f in config_files}:
            mounts.append(Mount(path, path, type="bind", read_only=True))
    elif os.path.exists("/etc/sysconfig/stap-server"):
        mounts.append(Mount("/etc/sysconfig/stap-server", "/etc/sysconfig/stap-server",
                            type="bind", read_only=True))
    return mounts, env


def _hashed(spec: dict[str, Any], image_id: str, kind: str, prefix: str, test_label: str,
            extra: dict[str, str]) -> dict[str, Any]:
    """SPEC with its labels: owner, kind, the spec hash (what a restart compares)."""
    body = {k: v for k, v in spec.items() if k != "mounts"}
    body["mounts"] = [dict(sorted(m.items())) for m in spec["mounts"]]
    body["image_id"] = image_id
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    spec["labels"] = {labels.OWNER: prefix, labels.KIND: kind, labels.SPEC_HASH: digest,
                      **extra}
    if test_label:
        spec["labels"][labels.TEST] = test_label
    return spec


def frontdoor_spec(image: str, image_id: str, gcfg: GlobalConfig, prefix: str, ids: Ids, *,
                   provision: bool, config_files: list[str],
                   environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for `client.containers.run(detach=True, **spec)`: the front door."""
    command = ["endpoint", "run", "--provision" if provision else "--no-provision"]
    for f in config_files:
        command += ["-c", f]
    conf_mounts, env = _config_mounts(config_files, environ)
    env.setdefault("STAPFARM_PREFIX", prefix)
    env["HOME"] = KEY_WORKDIR
    mounts = [Mount(ENDPOINT_MOUNT, os.path.dirname(identity_dir(gcfg)), type="bind",
                    read_only=True),
              Mount(CACHE_MOUNT, cache_volume(prefix), type="volume"),
              Mount(RUN_MOUNT, run_volume(prefix), type="volume", read_only=True),
              *conf_mounts]
    spec: dict[str, Any] = {
        "image": image,
        "name": container_name(prefix),
        "entrypoint": ["/usr/bin/tini", "--", "python3", "-m", "farm"],
        "command": command,
        "environment": env,
        "user": f"{ids.uid}:{ids.gid}",
        # Clients reach it on the host's port; it reaches the servers' ports on loopback.
        "network_mode": "host",
        "mounts": mounts,
        "restart_policy": {"Name": "unless-stopped"},
        "read_only": True,
        "tmpfs": {"/run/stapfarm/key": f"rw,noexec,nosuid,nodev,size=16m,mode=0700,"
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
    return _hashed(spec, image_id, "endpoint", prefix, environ.get("STAPFARM_TEST_LABEL", ""),
                   extra)


def broker_spec(image: str, image_id: str, gcfg: GlobalConfig, prefix: str, ids: Ids, *,
                provision: bool, config_files: list[str], environ: Mapping[str, str],
                docker_socket: str = DOCKER_SOCKET) -> dict[str, Any]:
    """Keyword arguments for `client.containers.run(detach=True, **spec)`: the broker."""
    command = ["endpoint", "broker", "--provision" if provision else "--no-provision",
               "--endpoint-ids", f"{ids.uid}:{ids.gid}"]
    for f in config_files:
        command += ["-c", f]
    conf_mounts, env = _config_mounts(config_files, environ)
    env.setdefault("STAPFARM_PREFIX", prefix)
    for k in ("STAPFARM_HOME_VOLUME", "STAPFARM_LOG_VOLUME", "STAPFARM_SERVER_UID",
              "STAPFARM_SERVER_GID"):
        if environ.get(k):
            env[k] = environ[k]
    log_dir = os.path.dirname(gcfg.log_file)
    # Provisioning starts servers as `stap-server start` does: their homes under STATE_DIR,
    # their logs, the host's users.
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
        # /var/tmp: provisioning spools a kernel tree's packages there (farm/kernels.py).
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
    return _hashed(spec, image_id, BROKER_KIND, prefix, environ.get("STAPFARM_TEST_LABEL", ""),
                   {})


def _offers(gcfg: GlobalConfig) -> list[str]:
    out = []
    for word in gcfg.endpoint_offer:
        arch, _, release = word.partition(":")
        if release:
            out.append(f"{Arch.parse(arch).stap}:{release}")
    return out


def _existing(client: Any, prefix: str, kind: str = "endpoint") -> Any:
    found = client.containers.list(all=True, filters={"label": [
        f"{labels.OWNER}={prefix}", f"{labels.KIND}={kind}"]})
    return found[0] if found else None


def _ensure_volume(client: Any, name: str, prefix: str, kind: str, test_label: str) -> None:
    """A labelled volume of the farm (kept across restarts)."""
    import docker.errors

    try:
        client.volumes.get(name)
    except docker.errors.NotFound:
        lab = {labels.OWNER: prefix, labels.KIND: kind}
        if test_label:
            lab[labels.TEST] = test_label
        client.volumes.create(name, labels=lab)


def _run(client: Any, spec: dict[str, Any], kind: str, prefix: str) -> Any:
    import docker.errors

    current = _existing(client, prefix, kind)
    if current is not None:
        if current.labels.get(labels.SPEC_HASH) == spec["labels"][labels.SPEC_HASH] \
                and current.status == "running":
            return current
        current.remove(force=True)
    try:
        return client.containers.run(detach=True, **spec)
    except docker.errors.APIError as e:
        raise ServerError(f"docker refused to start the endpoint's {kind}: "
                          f"{e.explanation or e}") from e


def ensure_endpoint(client: Any, gcfg: GlobalConfig, environ: Mapping[str, str], *,
                    provision: bool, config_files: list[str],
                    say: Callable[[str], None] = lambda s: None) -> Any:
    """Start PREFIX's endpoint (identity, broker, front door; idempotent) and wait until it
    answers TLS. Returns the front door's container.

    Raises:
        ServerError: no endpoint user, Docker refused, or it did not come up.
    """
    prefix = environ.get("STAPFARM_PREFIX", "stapfarm")
    test_label = environ.get("STAPFARM_TEST_LABEL", "")
    ids = Ids.of(gcfg)
    backend = DockerBackend.from_env(gcfg, environ)
    parent = os.path.dirname(identity_dir(gcfg))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(parent, ids.uid, ids.gid)
    backend.ensure_cert_db(identity_dir(gcfg), ids.uid, ids.gid)
    image = ensure_image(client, gcfg, say)
    for name, kind in ((cache_volume(prefix), "modcache"),
                       (run_volume(prefix), "endpoint-run")):
        _ensure_volume(client, name, prefix, kind, test_label)
    broker = _run(client, broker_spec(image_tag(gcfg), str(image.id), gcfg, prefix, ids,
                                      provision=provision, config_files=config_files,
                                      environ=environ), BROKER_KIND, prefix)
    front = _run(client, frontdoor_spec(image_tag(gcfg), str(image.id), gcfg, prefix, ids,
                                        provision=provision, config_files=config_files,
                                        environ=environ), "endpoint", prefix)
    last = tlsprobe.wait_answering(probe_address(gcfg.listen_address), gcfg.endpoint_port,
                                   90, lambda: still_running(front) and still_running(broker))
    if not last:
        return front
    logs = "\n".join(f"--- {c.name}:\n" + c.logs(tail=15).decode("utf-8", "replace").strip()
                     for c in (broker, front))
    for c in (front, broker):
        c.remove(force=True)
    raise ServerError(f"the endpoint did not answer TLS on port {gcfg.endpoint_port} ({last})"
                      f"\n{logs}")


def stop_endpoint(client: Any, prefix: str) -> bool:
    """Stop and remove PREFIX's endpoint (its cache and identity stay); whether one ran."""
    found = False
    for kind in ("endpoint", BROKER_KIND):
        c = _existing(client, prefix, kind)
        if c is None:
            continue
        found = True
        if c.status == "running":
            c.stop(timeout=10)
        c.remove(force=True)
    return found


def metrics(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> dict[str, float]:
    """The endpoint's metrics as {name: value} (samples summed over labels by name)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def endpoint_state(client: Any, prefix: str, host: str = "127.0.0.1") -> str:
    """One line for `status`: the endpoint, its port and its cache ("" when there is none)."""
    c = _existing(client, prefix)
    if c is None:
        return ""
    port = c.labels.get(labels.PORT, "?")
    if c.status != "running":
        return f"farm endpoint: {c.status} ({c.name}, port {port})"
    broker = _existing(client, prefix, BROKER_KIND)
    if broker is not None and broker.status != "running":
        return f"farm endpoint: broker {broker.status} ({broker.name}; port {port} answers " \
               "nothing but errors)"
    mport = int(c.labels.get(f"{labels.PREFIX}.metrics-port", "0") or 0)
    cache = ""
    if mport:
        try:
            m = metrics(mport, host)
            cache = (f"; cache {int(m.get('stapfarm_endpoint_cache_hits_total', 0))} hits, "
                     f"{int(m.get('stapfarm_endpoint_cache_misses_total', 0))} misses, "
                     f"{m.get('stapfarm_endpoint_cache_bytes', 0) / 2**20:.1f} MiB in "
                     f"{int(m.get('stapfarm_endpoint_cache_entries', 0))} modules")
        except (OSError, ValueError) as e:
            cache = f"; metrics unavailable ({e})"
    return f"farm endpoint: running on port {port} ({c.name}{cache})"


def check_provision_setting(value: str) -> bool:
    if value not in ("yes", "no"):
        raise ConfigError([f"--provision: '{value}' is not yes or no"])
    return value == "yes"


def parse_ids(text: str) -> Ids:
    """`UID:GID` of the broker's --endpoint-ids.

    Raises:
        ConfigError: not two numbers, or root.
    """
    uid, _, gid = text.partition(":")
    if not (uid.isdigit() and gid.isdigit()) or int(uid) == 0:
        raise ConfigError([f"--endpoint-ids: '{text}' is not UID:GID of an unprivileged user"])
    return Ids(int(uid), int(gid))
