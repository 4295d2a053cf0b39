"""The farm endpoint as a service: its container, its provisioning, its foreground run.

    stap-server endpoint start [--provision|--no-provision]  # ensure_endpoint(...)
    stap-server endpoint stop                                # stop_endpoint(...)
    stap-server endpoint run                                 # run_foreground(...): the container

The endpoint runs in the farm's service image (images/Dockerfile.advertiser) on the host
network, as root with the Docker socket (it reads the servers' labels and, with provisioning,
starts servers as `stap-server start` does; the socket is root-equivalent, as for the
advertiser). It mounts the farm's state directory and log directory at their host paths so
that servers it provisions get the same homes, certificates and logs as ones the command
line starts, and the host's user database read-only so that server users resolve as on the
host. Its module cache is the volume `<prefix>-modcache`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from docker.types import Mount

from farm import labels
from farm.arch import Arch
from farm.errors import ConfigError, FarmError, ServerError
from farm.spec import (
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_REQUEST_SIZE,
    GlobalConfig,
    ServerConfig,
)

log = logging.getLogger("stapfarm.endpoint")

CACHE_MOUNT = "/var/cache/stapfarm/modules"
DOCKER_SOCKET = "/var/run/docker.sock"
PROVISIONED = f"{labels.PREFIX}.provisioned"  # label on servers the endpoint started
MAX_PROVISIONED = 8
_SIZE = re.compile(r"([0-9]+)([bkmg]?)")


def parse_size(text: str) -> int:
    """`4g` → bytes (b, k, m, g suffixes, as MEMORY_LIMIT)."""
    m = _SIZE.fullmatch(text.strip().lower())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def cert_db(gcfg: GlobalConfig, user: str) -> str:
    """The certificate database the endpoint presents: the default server user's."""
    return os.path.join(gcfg.state_dir, "home", user, ".systemtap", "ssl", "server")


def server_user(gcfg: GlobalConfig) -> str:
    return gcfg.stap_user or "stap-server"


# --------------------------------------------------------------------------- provisioning


@dataclass
class DockerProvisioner:
    """Adds a kernel tree and starts a server for a target, as the command line would."""

    gcfg: GlobalConfig
    environ: Mapping[str, str]

    def offers(self) -> list[Any]:
        from farm.endpoint import Target

        out = []
        for word in self.gcfg.endpoint_offer:
            arch, _, release = word.partition(":")
            if release:
                out.append(Target(release, Arch.parse(arch).stap))
        return out

    def allowed(self, target: Any) -> bool:
        if not self.gcfg.endpoint_offer:
            return True
        for word in self.gcfg.endpoint_offer:
            arch, _, release = word.partition(":")
            if Arch.parse(arch).stap == target.arch and release in ("", target.release):
                return True
        return False

    def provision(self, target: Any, say: Callable[[str], None]) -> None:
        from farm import images
        from farm.debian import Mirror
        from farm.docker_backend import DockerBackend
        from farm.kernels import TreeStore, cache_dir

        try:
            arch = Arch.parse(target.arch)
        except FarmError as e:
            raise ServerError(f"cannot serve architecture {target.arch}: {e}") from e
        if not self.allowed(target):
            raise ServerError(f"{target.release} {target.arch} is not offered by this farm "
                              f"(ENDPOINT_OFFER={' '.join(self.gcfg.endpoint_offer)})")
        backend = DockerBackend.from_env(self.gcfg, self.environ)
        existing = backend.client.containers.list(filters={"label": [
            f"{labels.OWNER}={backend.prefix}", PROVISIONED]})
        if len(existing) >= MAX_PROVISIONED:
            raise ServerError(f"{len(existing)} provisioned servers already run (at most "
                              f"{MAX_PROVISIONED}); stop some with `stap-server stop -n`")
        cfg = ServerConfig(arch=arch.stap, releases=(target.release,),
                           user=server_user(self.gcfg),
                           nickname=f"auto-{arch.machine}-{target.release}",
                           log=self.gcfg.log_file, source="endpoint")
        plan = backend.plan_for(cfg)
        store = TreeStore(backend.client, backend.prefix, plan.image_arch,
                          images.image_tag(self.gcfg, plan.image_arch),
                          test_label=backend.test_label)
        mirror = Mirror(self.gcfg.debian_mirror, cache_dir(self.gcfg.state_dir))
        say(f"adding the kernel tree {target.release} ({arch.machine})")
        store.add(mirror, self.gcfg.kernel_suites, arch, target.release, say=say)
        say(f"starting a {plan.strategy.value} server for {target.release} ({arch.machine})")
        backend.extra_labels = {PROVISIONED: "1"}
        server = backend.start(cfg)
        say(f"server {server.nickname} answers on port {server.port}")


# --------------------------------------------------------------------------- foreground


def run_foreground(gcfg: GlobalConfig, environ: Mapping[str, str], *, provision: bool,
                   workdir: str = "/run/stapfarm", cache_dir: str = CACHE_MOUNT,
                   stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or STOP): what the endpoint container runs.

    Raises:
        FarmError: no certificate database, the port is taken, or Docker is unreachable.
    """
    from prometheus_client import start_http_server

    from farm.advertiser import probe_address
    from farm.dockerclient import connect
    from farm.endpoint import DockerDirectory, Endpoint, Settings
    from farm.modcache import ModuleCache

    client = connect(environ)
    prefix = environ.get("STAPFARM_PREFIX", "stapfarm")
    directory = DockerDirectory(client, prefix, host=probe_address(gcfg.listen_address))
    cache = ModuleCache(cache_dir, parse_size(gcfg.endpoint_cache_size))
    provisioner = DockerProvisioner(gcfg, environ) if provision else None
    version = _stap_version(client, gcfg)
    from farm.endpoint import exported_identity

    os.makedirs(workdir, mode=0o700, exist_ok=True)
    with exported_identity(cert_db(gcfg, server_user(gcfg)), workdir) as (cert, key):
        settings = Settings(listen=gcfg.listen_address, port=gcfg.endpoint_port,
                            cert_file=cert, key_file=key,
                            max_compressed=DEFAULT_MAX_COMPRESSED_REQUEST,
                            max_uncompressed=DEFAULT_MAX_REQUEST_SIZE,
                            idle_timeout=float(gcfg.endpoint_idle_timeout),
                            max_connections=gcfg.endpoint_max_connections,
                            server_version=version)
        endpoint = Endpoint(settings, directory, cache, provisioner)
    if gcfg.endpoint_metrics_port:
        start_http_server(gcfg.endpoint_metrics_port, gcfg.listen_address,
                          registry=endpoint.metrics.registry)
    loop = asyncio.new_event_loop()
    task = loop.create_task(endpoint.serve())
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
    except OSError as e:
        raise ServerError(f"the endpoint cannot listen on port {gcfg.endpoint_port}: "
                          f"{e.strerror or e}", hint="set ENDPOINT_PORT") from e
    finally:
        loop.close()


def _stap_version(client: Any, gcfg: GlobalConfig) -> str:
    """The systemtap version of the host-arch server image (what the endpoint reports in the
    responses it writes itself)."""
    from farm import images, mdns

    try:
        out = client.containers.run(images.image_tag(gcfg, Arch.host()), ["stap", "-V"],
                                    entrypoint=[], remove=True, network_mode="none",
                                    stderr=True)
        return mdns.parse_stap_version(out.decode("utf-8", "replace"))
    except Exception as e:  # noqa: BLE001 - only the error responses' version field
        log.warning("cannot read the servers' systemtap version (%s); reporting 5.0", e)
        return "5.0"


# --------------------------------------------------------------------------- container


def container_name(prefix: str) -> str:
    return f"{prefix}-endpoint"


def cache_volume(prefix: str) -> str:
    return f"{prefix}-modcache"


def container_spec(image: str, image_id: str, gcfg: GlobalConfig, prefix: str, *,
                   provision: bool, config_files: list[str], environ: Mapping[str, str],
                   docker_socket: str = DOCKER_SOCKET) -> dict[str, Any]:
    """Keyword arguments for `client.containers.run(detach=True, **spec)`."""
    test_label = environ.get("STAPFARM_TEST_LABEL", "")
    command = ["endpoint", "run", "--provision" if provision else "--no-provision"]
    for f in config_files:
        command += ["-c", f]
    log_dir = os.path.dirname(gcfg.log_file)
    mounts = [Mount(DOCKER_SOCKET, docker_socket, type="bind"),
              Mount(CACHE_MOUNT, cache_volume(prefix), type="volume"),
              Mount(gcfg.state_dir, gcfg.state_dir, type="bind"),
              Mount(log_dir, log_dir, type="bind"),
              Mount("/etc/passwd", "/etc/passwd", type="bind", read_only=True),
              Mount("/etc/group", "/etc/group", type="bind", read_only=True)]
    for f in config_files:
        mounts.append(Mount(os.path.abspath(f), os.path.abspath(f), type="bind",
                            read_only=True))
    env = {k: environ[k] for k in ("STAPFARM_PREFIX", "STAPFARM_TEST_LABEL", "STAPFARM_HOSTNAME",
                                   "STAPFARM_CONFIG_FILE") if environ.get(k)}
    env.setdefault("STAPFARM_PREFIX", prefix)
    if environ.get("STAPFARM_CONFIG_FILE"):
        path = os.path.abspath(environ["STAPFARM_CONFIG_FILE"])
        env["STAPFARM_CONFIG_FILE"] = path
        if os.path.exists(path) and path not in {os.path.abspath(f) for f in config_files}:
            mounts.append(Mount(path, path, type="bind", read_only=True))
    elif os.path.exists("/etc/sysconfig/stap-server"):
        mounts.append(Mount("/etc/sysconfig/stap-server", "/etc/sysconfig/stap-server",
                            type="bind", read_only=True))
    spec: dict[str, Any] = {
        "image": image,
        "name": container_name(prefix),
        "entrypoint": ["/usr/bin/tini", "--", "python3", "-m", "farm"],
        "command": command,
        "environment": env,
        # The servers' published ports are on the host; clients reach the endpoint there too.
        "network_mode": "host",
        "mounts": mounts,
        "restart_policy": {"Name": "unless-stopped"},
        "read_only": True,
        # /var/tmp: provisioning spools a kernel tree's packages there (farm/kernels.py).
        "tmpfs": {"/run/stapfarm": "rw,noexec,nosuid,size=16m,mode=0700", "/tmp": "rw,size=64m",
                  "/var/tmp": "rw,noexec,nosuid,size=768m"},
        # root without most capabilities: it reads the certificate database (DAC_OVERRIDE),
        # and with provisioning prepares server homes as `stap-server start` does.
        "cap_drop": ["ALL"],
        "cap_add": ["DAC_OVERRIDE", "CHOWN", "FOWNER"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": "2g",  # tmpfs pages count: /var/tmp holds a tree being provisioned
        "pids_limit": 256,
        "stop_signal": "SIGTERM",
    }
    body = {k: v for k, v in spec.items() if k != "mounts"}
    body["mounts"] = [dict(sorted(m.items())) for m in mounts]
    body["image_id"] = image_id
    body["endpoint"] = [gcfg.endpoint_port, gcfg.endpoint_metrics_port]
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    spec["labels"] = {labels.OWNER: prefix, labels.KIND: "endpoint", labels.SPEC_HASH: digest,
                      labels.PORT: str(gcfg.endpoint_port),
                      f"{labels.PREFIX}.metrics-port": str(gcfg.endpoint_metrics_port)}
    if provision:
        offers = []
        for word in gcfg.endpoint_offer:
            arch, _, release = word.partition(":")
            if release:
                offers.append(f"{Arch.parse(arch).stap}:{release}")
        spec["labels"][labels.OFFERS] = " ".join(offers)
    if test_label:
        spec["labels"][labels.TEST] = test_label
    return spec


def _existing(client: Any, prefix: str) -> Any:
    found = client.containers.list(all=True, filters={"label": [
        f"{labels.OWNER}={prefix}", f"{labels.KIND}=endpoint"]})
    return found[0] if found else None


def ensure_endpoint(client: Any, gcfg: GlobalConfig, environ: Mapping[str, str], *,
                    provision: bool, config_files: list[str],
                    say: Callable[[str], None] = lambda s: None) -> Any:
    """Start PREFIX's endpoint container (idempotent) and wait until it answers TLS.

    Raises:
        ServerError: no certificate database yet, Docker refused, or it did not come up.
    """
    import docker.errors

    from farm import tlsprobe
    from farm.advertiser import probe_address
    from farm.advertiser_image import ensure_image, image_tag
    from farm.dockerclient import still_running

    prefix = environ.get("STAPFARM_PREFIX", "stapfarm")
    db = cert_db(gcfg, server_user(gcfg))
    if not os.path.exists(os.path.join(db, "stap.cert")):
        raise ServerError(f"the endpoint presents the servers' certificate, and {db} has none "
                          "yet", hint="start a server first (`stap-server start ...`)")
    image = ensure_image(client, gcfg, say)
    spec = container_spec(image_tag(gcfg), str(image.id), gcfg, prefix, provision=provision,
                          config_files=config_files, environ=environ)
    current = _existing(client, prefix)
    if current is not None:
        if current.labels.get(labels.SPEC_HASH) == spec["labels"][labels.SPEC_HASH] \
                and current.status == "running":
            return current
        current.remove(force=True)
    _ensure_cache_volume(client, prefix, environ.get("STAPFARM_TEST_LABEL", ""))
    try:
        container = client.containers.run(detach=True, **spec)
    except docker.errors.APIError as e:
        raise ServerError(f"docker refused to start the endpoint: {e.explanation or e}") from e
    last = tlsprobe.wait_answering(probe_address(gcfg.listen_address), gcfg.endpoint_port,
                                   60, lambda: still_running(container))
    if not last:
        return container
    logs = container.logs(tail=15).decode("utf-8", "replace").strip()
    container.remove(force=True)
    raise ServerError(f"the endpoint did not answer TLS on port {gcfg.endpoint_port} ({last})"
                      + (f"\n--- its output:\n{logs}" if logs else ""))


def _ensure_cache_volume(client: Any, prefix: str, test_label: str) -> None:
    """The module cache volume, labelled like every farm resource (kept across restarts)."""
    import docker.errors

    try:
        client.volumes.get(cache_volume(prefix))
    except docker.errors.NotFound:
        lab = {labels.OWNER: prefix, labels.KIND: "modcache"}
        if test_label:
            lab[labels.TEST] = test_label
        client.volumes.create(cache_volume(prefix), labels=lab)


def stop_endpoint(client: Any, prefix: str) -> bool:
    """Stop and remove PREFIX's endpoint (its cache volume stays); whether one ran."""
    c = _existing(client, prefix)
    if c is None:
        return False
    if c.status == "running":
        c.stop(timeout=10)
    c.remove(force=True)
    return True


def metrics(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> dict[str, float]:
    """The endpoint's metrics as {name{labels}: value} (samples summed over labels by name)."""
    from prometheus_client.parser import text_string_to_metric_families

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
