"""The farm endpoint as a service: what its two containers run, in the foreground.

    stap-server endpoint run       # run_frontdoor(...): the front door's container
    stap-server endpoint broker    # run_broker(...): the broker's container
    (start/stop/status: farm/engine/endpoint.py; the specs: farm/engine/service_specs.py)

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
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import start_http_server

from farm.core.errors import ConfigError, FarmError, ServerError
from farm.core.spec import (
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_REQUEST_SIZE,
    GlobalConfig,
    ServerConfig,
)
from farm.endpoint.broker import Broker
from farm.endpoint.broker_client import BrokerDirectory
from farm.endpoint.broker_engine import DockerEngine
from farm.endpoint.identity import Signer, exported_identity
from farm.endpoint.modcache import ModuleCache
from farm.endpoint.policy import Policy
from farm.endpoint.routing import Target
from farm.endpoint.server import Endpoint, Settings
from farm.engine.docker import Engine
from farm.engine.service_specs import CACHE_MOUNT, IDENTITY_MOUNT, KEY_WORKDIR, SOCKET, Ids

log = logging.getLogger("stapfarm.endpoint")

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
               ids: Ids, resolve: Callable[[Target], ServerConfig],
               socket_path: str = SOCKET, cache_dir: str = CACHE_MOUNT,
               stop: threading.Event | None = None) -> None:
    """Answer the front door until SIGTERM/SIGINT (or STOP): the broker's container. RESOLVE
    makes a provisioned server's configuration (the command line's resolver).

    Raises:
        FarmError: Docker is unreachable.
    """
    engine = Engine.connect(environ, gcfg.prefix, gcfg.test_label)
    for path, mode in ((os.path.dirname(socket_path), 0o750), (cache_dir, 0o700)):
        if os.path.isdir(path) and os.geteuid() == 0:
            os.chown(path, 0 if path != cache_dir else ids.uid, ids.gid)
            os.chmod(path, mode)
            if path == cache_dir:  # a cache the old root endpoint wrote
                for root, dirs, files in os.walk(path):
                    for name in dirs + files:
                        os.lchown(os.path.join(root, name), ids.uid, ids.gid)
    broker = Broker(DockerEngine(engine, gcfg, resolve), offer=gcfg.endpoint_offer,
                    provision_enabled=provision,
                    max_provisioned=gcfg.endpoint_max_provisioned,
                    idle=float(gcfg.endpoint_provision_idle))
    stopping = stop or threading.Event()
    if stop is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
    broker.serve(socket_path, group=ids.gid, stop=stopping)


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
