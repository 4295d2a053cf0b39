"""The broker's Engine (farm/endpoint/broker.py) on the farm's Docker engine: the routing
table read from the servers' labels and files, and provisioning as `stap-server start` does.
Every Docker call goes through farm/engine/docker.py."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from farm.core import labels
from farm.core.arch import Arch
from farm.core.errors import FarmError, ServerError
from farm.core.spec import GlobalConfig, ServerConfig
from farm.discovery import mdns
from farm.endpoint.routing import Target, Upstream
from farm.engine import images
from farm.engine.docker import Engine, started_at
from farm.engine.servers import DockerBackend
from farm.engine.specs import HOME, SSL, config_from_json
from farm.engine.trees import TreeStore
from farm.kernels import trees as kernels
from farm.kernels.debian import Mirror
from farm.kernels.trees import MANIFESTS, MOUNT

log = logging.getLogger("stapfarm.broker")

TREE_TTL = 5.0  # seconds a tree digest is reused
PIN_TTL = 60.0  # seconds a server's certificate is reused (a renewal is seen within this)
PROVISIONED = labels.PROVISIONED


@dataclass
class DockerEngine:
    """The broker's Engine for the servers of ENGINE's farm. RESOLVE makes the server
    configuration of a target (the command line's resolver: the same defaults as `start`)."""

    engine: Engine
    gcfg: GlobalConfig
    resolve: Callable[[Target], ServerConfig]
    _trees: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    _pins: dict[str, tuple[float, bytes]] = field(default_factory=dict)
    _version: str = ""

    def servers(self) -> list[Upstream]:
        out = []
        containers = self.engine.containers("server", running=True)
        for c in containers:
            try:
                out.append(self._upstream(c))
            except (FarmError, ValueError, TypeError, KeyError) as e:
                log.warning("ignoring %s: %s", c.name, e)  # one odd container: not routed
        seen = {str(c.id) for c in containers}
        self._pins = {k: v for k, v in self._pins.items() if k in seen}
        self._trees = {k: v for k, v in self._trees.items() if k[0] in seen}
        return out

    def _upstream(self, c: Any) -> Upstream:
        cfg = config_from_json(c.labels[labels.CONFIG])
        port = int(c.labels.get(labels.PORT, "0") or 0)
        releases = tuple(c.labels.get(labels.RELEASES, "").split()) or cfg.releases
        image = str(c.attrs.get("Image", ""))
        options = {"arch": cfg.arch, "build": list(cfg.build), "define": list(cfg.define),
                   "include": list(cfg.include), "runtime": cfg.runtime, "user": cfg.user,
                   "strategy": c.labels.get(labels.STRATEGY, ""), "image": image,
                   "image_arch": c.labels.get(labels.IMAGE_ARCH, "")}
        identity = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
        trees = {r: self._tree(c, r) for r in releases}
        return Upstream(name=str(c.name), host=self.gcfg.probe_address, port=port,
                        arch=cfg.arch, releases=releases, identity=identity, tree_ids=trees,
                        slots=cfg.max_threads or 2, pin=self._pin(c, cfg.ssl),
                        handle=f"{c.id} {image}", provisioned=PROVISIONED in c.labels)

    def _pin(self, c: Any, ssl_dir: str) -> bytes:
        """The certificate C presents: its database's stap.cert, read from the container."""
        now = time.monotonic()
        cached = self._pins.get(str(c.id))
        if cached and now - cached[0] < PIN_TTL:
            return cached[1]
        path = f"{SSL}/stap.cert" if ssl_dir else f"{HOME}/.systemtap/ssl/server/stap.cert"
        der = self.engine.read_file(c, path)
        if not der:
            raise ServerError(f"{c.name} has no certificate at {path} yet")
        self._pins[str(c.id)] = (now, der)
        return der

    def still_current(self, handle: str) -> bool:
        container_id, _, image = handle.partition(" ")
        c = self.engine.container(container_id)
        return bool(c is not None and c.status == "running"
                    and str(c.attrs.get("Image", "")) == image)

    def _tree(self, c: Any, release: str) -> str:
        """Digest of RELEASE's manifest in C's kernel volume ("" when the tree is gone)."""
        key = (str(c.id), release)
        now = time.monotonic()
        cached = self._trees.get(key)
        if cached and now - cached[0] < TREE_TTL:
            return cached[1]
        data = self.engine.read_file(c, f"{MOUNT}/{MANIFESTS}/{release}.json")
        digest = hashlib.sha256(data).hexdigest() if data else ""
        self._trees[key] = (now, digest)
        return digest

    def available(self, arch: Arch) -> list[str]:
        mirror = Mirror.from_config(self.gcfg, kernels.cache_dir(self.gcfg.state_dir))
        return kernels.available(mirror, self.gcfg.kernel_suites, arch)

    def provisioned(self) -> list[tuple[str, float]]:
        out = []
        for c in self.engine.containers("server", running=True, having=[PROVISIONED]):
            started = _unix_time(started_at(c))
            # The broker's clock is monotonic; convert the wall-clock start time.
            out.append((str(c.name), time.monotonic() - max(0.0, time.time() - started)))
        return out

    def provision(self, target: Target, say: Callable[[str], None]) -> None:
        arch = Arch.parse(target.arch)
        cfg = self.resolve(target)
        backend = DockerBackend.of(self.engine, self.gcfg)
        plan = backend.plan_for(cfg)
        store = TreeStore(self.engine, plan.image_arch,
                          images.image_tag(self.gcfg, plan.image_arch))
        mirror = Mirror.from_config(self.gcfg, kernels.cache_dir(self.gcfg.state_dir))
        say(f"adding the kernel tree {target.release} ({arch.machine})")
        store.add(mirror, self.gcfg.kernel_suites, arch, target.release, say=say)
        say(f"starting a {plan.strategy.value} server for {target.release} ({arch.machine})")
        backend.extra_labels = {PROVISIONED: "1"}
        server = backend.start(cfg)
        say(f"server {server.nickname} answers on port {server.port}")

    def retire(self, name: str) -> None:
        c = self.engine.container(name)
        if c is not None:
            self.engine.remove(c)

    def version(self) -> str:
        """The systemtap version of the host-arch server image (what the front door
        reports in the answers it writes itself)."""
        if self._version:
            return self._version
        try:
            out = self.engine.job(images.image_tag(self.gcfg, Arch.host()), ["stap", "-V"],
                                  what="stap -V", entrypoint=[], network_mode="none")
            self._version = mdns.parse_stap_version(out)
        except (FarmError, ValueError) as e:  # only the error answers' version field
            log.warning("cannot read the servers' systemtap version (%s); reporting 5.0", e)
            return "5.0"
        return self._version


def _unix_time(text: str) -> float:
    """Docker's StartedAt (RFC 3339 with nanoseconds) as a Unix time (now when unreadable)."""
    try:
        head = text.split(".")[0].rstrip("Z")
        return datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC).timestamp()
    except ValueError:
        return time.time()
