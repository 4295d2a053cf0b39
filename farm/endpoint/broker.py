"""The endpoint's broker: the only part of the endpoint that talks to the Docker engine.

The front door (farm/endpoint/server.py) faces the network unprivileged and without the
Docker socket; what needs the engine is here, in a separate container (root, the socket, no
listening port), behind a Unix socket with a narrow JSON protocol (one request line, one
answer line, each at most MAX_MESSAGE bytes):

    {"op": "hello"}                          -> {"ok": true, "version": "5.6"}
    {"op": "upstreams", "used": [names]}     -> {"ok": true, "upstreams": [Upstream...]}
    {"op": "still_current", "handle": h}     -> {"ok": true, "current": bool}
    {"op": "provision", "release": r, "arch": a}
                                             -> {"ok": true} | {"ok": false, "error": "..."}

The broker answers `upstreams` from a table it refreshes itself every REFRESH seconds (so the
front door never makes it call Docker per request), checks every provisioning request against
ENDPOINT_OFFER and the mirror's current list (cached) before any container work, provisions
one target at a time, remembers failures for FAILURE_MEMORY seconds, counts provisioned
servers under the same lock, and retires provisioned servers nobody used for
ENDPOINT_PROVISION_IDLE seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import socketserver
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from farm.core import labels
from farm.core.arch import Arch
from farm.core.errors import FarmError, ServerError
from farm.core.spec import GlobalConfig
from farm.discovery import mdns
from farm.endpoint.routing import Target, Upstream
from farm.engine import images
from farm.engine.servers import DockerBackend
from farm.engine.specs import HOME, SSL, config_from_json
from farm.kernels import trees as kernels
from farm.kernels.debian import Mirror
from farm.kernels.trees import MANIFESTS, MOUNT, TreeStore
from farm.manual.config import Host, ServerDraft, resolve_server

log = logging.getLogger("stapfarm.broker")

MAX_MESSAGE = 1 << 20  # bytes of one request or answer line
REFRESH = 2.0  # seconds between looks at the engine
TREE_TTL = 5.0  # seconds a tree digest is reused
PIN_TTL = 60.0  # seconds a server's certificate is reused (a renewal is seen within this)
LIST_TTL = 600.0  # seconds the mirror's list of releases is reused
FAILURE_MEMORY = 600.0  # seconds a failed provisioning of a target is answered from memory
PROVISIONED = f"{labels.PREFIX}.provisioned"  # label on servers the endpoint started


class Engine(Protocol):
    """What the broker does with Docker (DockerEngine below; a fake in unit tests)."""

    def servers(self) -> list[Upstream]: ...

    def still_current(self, handle: str) -> bool: ...

    def available(self, arch: Arch) -> list[str]: ...

    def provisioned(self) -> list[tuple[str, float]]:
        """(container name, start time) of every running provisioned server."""
        ...

    def provision(self, target: Target, say: Callable[[str], None]) -> None: ...

    def retire(self, name: str) -> None: ...

    def version(self) -> str: ...


@dataclass
class Broker:
    """The broker's state and rules; `serve()` puts it behind a Unix socket."""

    engine: Engine
    offer: tuple[str, ...] = ()  # ENDPOINT_OFFER words
    provision_enabled: bool = False
    max_provisioned: int = 8
    idle: float = 14400.0  # ENDPOINT_PROVISION_IDLE (0 = never retire)
    clock: Callable[[], float] = time.monotonic
    _table: list[Upstream] = field(default_factory=list)
    _table_at: float = -1e9
    _last_used: dict[str, float] = field(default_factory=dict)
    _lists: dict[str, tuple[float, list[str]]] = field(default_factory=dict)
    _failures: dict[Target, tuple[float, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # table, usage
    _provisioning: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ table
    def refresh(self) -> None:
        """Look at the engine once: the servers, then retire idle provisioned ones."""
        table = self.engine.servers()
        with self._lock:
            self._table = table
            self._table_at = self.clock()
        self.retire_idle()

    def upstreams(self, used: list[str]) -> list[Upstream]:
        now = self.clock()
        with self._lock:
            for name in used[:4096]:
                self._last_used[name] = now
            stale = now - self._table_at > 4 * REFRESH
        if stale:
            self.refresh()
        with self._lock:
            return list(self._table)

    def retire_idle(self) -> None:
        if not self.idle:
            return
        now = self.clock()
        for name, started in self.engine.provisioned():
            with self._lock:
                last = max(self._last_used.get(name, started), started)
            if now - last > self.idle:
                log.info("retiring %s: unused for %.0f s (ENDPOINT_PROVISION_IDLE)", name,
                         now - last)
                try:
                    self.engine.retire(name)
                except FarmError as e:
                    log.warning("cannot retire %s: %s", name, e)
                with self._lock:
                    self._last_used.pop(name, None)

    # ------------------------------------------------------------------ provisioning
    def offered(self, target: Target) -> str:
        """Why TARGET may not be provisioned ("" when it may), without container work."""
        if not self.provision_enabled:
            return "provisioning is off (ENDPOINT_PROVISION)"
        if not target.well_formed:
            return "not a kernel release and architecture"
        try:
            arch = Arch.parse(target.arch)
        except FarmError:
            return f"architecture {target.arch} is not one the farm serves"
        if arch.stap != target.arch:
            return f"architecture {target.arch} is not spelt as stap does"
        if self.offer:
            allowed = False
            for word in self.offer:
                a, _, release = word.partition(":")
                with contextlib.suppress(FarmError):
                    if Arch.parse(a).stap == arch.stap and release in ("", target.release):
                        allowed = True
            if not allowed:
                return f"not offered by this farm (ENDPOINT_OFFER={' '.join(self.offer)})"
        listed = self._available(arch)
        if target.release not in listed:
            return (f"the mirror has no kernel release {target.release} for {arch.machine}"
                    + (f" (newest: {', '.join(listed[:3])})" if listed else ""))
        return ""

    def _available(self, arch: Arch) -> list[str]:
        now = self.clock()
        cached = self._lists.get(arch.stap)
        if cached is None or now - cached[0] > LIST_TTL:
            cached = (now, self.engine.available(arch))
            self._lists[arch.stap] = cached
        return cached[1]

    def provision(self, target: Target) -> str:
        """Provision TARGET; "" on success, else the reason (remembered for a while)."""
        with self._provisioning:  # one at a time, whatever the target
            now = self.clock()
            failed = self._failures.get(target)
            if failed is not None and now - failed[0] < FAILURE_MEMORY:
                return failed[1]
            reason = self.offered(target)  # before anything that asks the engine
            if not reason and any(u.serves(target) for u in self.upstreams([])):
                return ""  # someone else's provisioning, or a server started meanwhile
            if not reason and len(self.engine.provisioned()) >= self.max_provisioned:
                reason = (f"{self.max_provisioned} provisioned servers already run "
                          "(ENDPOINT_MAX_PROVISIONED); its operator can stop some with "
                          "`stap-server stop -n`")
            if not reason:
                try:
                    self.engine.provision(target, lambda line: log.info("%s: %s", target,
                                                                        line))
                except FarmError as e:
                    reason = str(e).splitlines()[0]
                except Exception as e:  # Docker's own errors: remembered, never raised
                    log.exception("provisioning %s failed", target)
                    reason = f"provisioning failed ({type(e).__name__})"
            if reason:
                log.info("not provisioning %s: %s", target, reason)
                self._failures[target] = (self.clock(), reason)
                # Remembered failures are bounded: the oldest go first.
                while len(self._failures) > 1024:
                    del self._failures[next(iter(self._failures))]
                return reason
            self._failures.pop(target, None)
            with self._lock:
                self._table_at = -1e9  # the next look sees the new server
            return ""

    # ------------------------------------------------------------------ protocol
    def handle(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """One request of the socket protocol; never raises for bad input."""
        op = message.get("op")
        try:
            if op == "hello":
                return {"ok": True, "version": self.engine.version()}
            if op == "upstreams":
                used = message.get("used") or []
                if not isinstance(used, list):
                    return {"ok": False, "error": "used must be a list"}
                return {"ok": True, "upstreams": [u.to_json() for u in
                                                  self.upstreams([str(n) for n in used])]}
            if op == "still_current":
                return {"ok": True,
                        "current": self.engine.still_current(str(message.get("handle", "")))}
            if op == "provision":
                target = Target(str(message.get("release", "")), str(message.get("arch", "")))
                reason = self.provision(target)
                return {"ok": not reason, "error": reason}
        except FarmError as e:
            return {"ok": False, "error": str(e).splitlines()[0]}
        return {"ok": False, "error": f"unknown operation {str(op)[:40]!r}"}

    def serve(self, path: str, group: int | None = None,
              stop: threading.Event | None = None) -> None:
        """Answer on the Unix socket PATH (mode 0660, GROUP) until STOP is set."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        broker = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30  # seconds to read a request line

            def handle(self) -> None:
                line = self.rfile.readline(MAX_MESSAGE + 1)
                if not line.endswith(b"\n") or len(line) > MAX_MESSAGE:
                    answer: dict[str, Any] = {"ok": False, "error": "request too long"}
                else:
                    try:
                        message = json.loads(line)
                    except ValueError as e:
                        message = None
                        answer = {"ok": False, "error": f"bad request: {e}"}
                    if isinstance(message, dict):
                        answer = broker.handle(message)
                    elif message is not None:
                        answer = {"ok": False, "error": "bad request: not an object"}
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        server = Server(path, Handler)
        os.chmod(path, 0o660)
        if group is not None and os.geteuid() == 0:
            os.chown(path, 0, group)
        stopping = stop or threading.Event()
        refresher = threading.Thread(target=self._refresh_loop, args=(stopping,),
                                     name="broker-refresh", daemon=True)
        refresher.start()
        def watch() -> None:
            stopping.wait()
            server.shutdown()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        log.info("broker answering on %s", path)
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            stopping.set()
            server.server_close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _refresh_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the engine restarting: next time
                log.warning("cannot look at the engine: %s", e)
            stop.wait(REFRESH)


# --------------------------------------------------------------------------- Docker


@dataclass
class DockerEngine:
    """The broker's Engine on a real Docker engine, for the servers of PREFIX."""

    client: Any
    prefix: str
    gcfg: GlobalConfig
    environ: Mapping[str, str]
    host: str = "127.0.0.1"  # where the servers' published ports answer
    _trees: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    _pins: dict[str, tuple[float, bytes]] = field(default_factory=dict)
    _version: str = ""

    def _containers(self, *extra: str) -> list[Any]:
        return list(self.client.containers.list(filters={"label": [
            f"{labels.OWNER}={self.prefix}", f"{labels.KIND}=server", *extra],
            "status": "running"}))

    def servers(self) -> list[Upstream]:
        out = []
        containers = self._containers()
        for c in containers:
            try:
                out.append(self._upstream(c))
            except Exception as e:  # noqa: BLE001 - one odd container must not stop routing
                log.warning("ignoring %s: %s", getattr(c, "name", c), e)
        seen = {str(c.id) for c in containers}
        self._pins = {k: v for k, v in self._pins.items() if k in seen}
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
        return Upstream(name=str(c.name), host=self.host, port=port, arch=cfg.arch,
                        releases=releases, identity=identity, tree_ids=trees,
                        slots=cfg.max_threads or 2, pin=self._pin(c, cfg.ssl),
                        handle=f"{c.id} {image}", provisioned=PROVISIONED in c.labels)

    def _pin(self, c: Any, ssl_dir: str) -> bytes:
        """The certificate C presents: its database's stap.cert, read from the container."""
        now = time.monotonic()
        cached = self._pins.get(str(c.id))
        if cached and now - cached[0] < PIN_TTL:
            return cached[1]
        path = f"{SSL}/stap.cert" if ssl_dir else f"{HOME}/.systemtap/ssl/server/stap.cert"
        der = _read_file(c, path)
        if not der:
            raise ServerError(f"{c.name} has no certificate at {path} yet")
        self._pins[str(c.id)] = (now, der)
        return der

    def still_current(self, handle: str) -> bool:
        container_id, _, image = handle.partition(" ")
        try:
            c = self.client.containers.get(container_id)
        except Exception:  # noqa: BLE001 - NotFound: it is gone
            return False
        return bool(c.status == "running" and str(c.attrs.get("Image", "")) == image)

    def _tree(self, c: Any, release: str) -> str:
        """Digest of RELEASE's manifest in C's kernel volume ("" when the tree is gone)."""
        key = (str(c.id), release)
        now = time.monotonic()
        cached = self._trees.get(key)
        if cached and now - cached[0] < TREE_TTL:
            return cached[1]
        data = _read_file(c, f"{MOUNT}/{MANIFESTS}/{release}.json")
        digest = hashlib.sha256(data).hexdigest() if data else ""
        self._trees[key] = (now, digest)
        return digest

    def available(self, arch: Arch) -> list[str]:
        mirror = Mirror.from_config(self.gcfg, kernels.cache_dir(self.gcfg.state_dir))
        return kernels.available(mirror, self.gcfg.kernel_suites, arch)

    def provisioned(self) -> list[tuple[str, float]]:
        out = []
        for c in self._containers(PROVISIONED):
            started = _parse_started(str(c.attrs.get("State", {}).get("StartedAt", "")))
            # The broker's clock is monotonic; convert the wall-clock start time.
            out.append((str(c.name), time.monotonic() - max(0.0, time.time() - started)))
        return out

    def provision(self, target: Target, say: Callable[[str], None]) -> None:
        arch = Arch.parse(target.arch)
        host = Host(arch=Arch.host().stap, release=os.uname().release, euid=0, user="root",
                    cwd="/")
        cfg = resolve_server(ServerDraft(arch=arch.stap, releases=[target.release],
                                         nickname=f"auto-{arch.machine}-{target.release}",
                                         source="endpoint"), self.gcfg, host)
        backend = DockerBackend.from_env(self.gcfg, self.environ)
        plan = backend.plan_for(cfg)
        store = TreeStore(backend.client, backend.prefix, plan.image_arch,
                          images.image_tag(self.gcfg, plan.image_arch),
                          test_label=backend.test_label)
        mirror = Mirror.from_config(self.gcfg, kernels.cache_dir(self.gcfg.state_dir))
        say(f"adding the kernel tree {target.release} ({arch.machine})")
        store.add(mirror, self.gcfg.kernel_suites, arch, target.release, say=say)
        say(f"starting a {plan.strategy.value} server for {target.release} ({arch.machine})")
        backend.extra_labels = {PROVISIONED: "1"}
        server = backend.start(cfg)
        say(f"server {server.nickname} answers on port {server.port}")

    def retire(self, name: str) -> None:
        try:
            c = self.client.containers.get(name)
            c.stop(timeout=10)
            c.remove(force=True)
        except Exception as e:  # Docker's errors, translated here
            raise ServerError(f"cannot remove {name}: {e}") from e

    def version(self) -> str:
        """The systemtap version of the host-arch server image (what the front door
        reports in the answers it writes itself)."""
        if self._version:
            return self._version
        try:
            out = self.client.containers.run(images.image_tag(self.gcfg, Arch.host()),
                                             ["stap", "-V"], entrypoint=[], remove=True,
                                             network_mode="none", stderr=True)
            self._version = mdns.parse_stap_version(out.decode("utf-8", "replace"))
        except Exception as e:  # noqa: BLE001 - only the error answers' version field
            log.warning("cannot read the servers' systemtap version (%s); reporting 5.0", e)
            return "5.0"
        return self._version


def _read_file(c: Any, path: str) -> bytes:
    """The content of the regular file PATH in container C (b"" when it is not there)."""
    try:
        stream, _ = c.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            for m in tar.getmembers():
                f = tar.extractfile(m)
                if f is not None:
                    return f.read(MAX_MESSAGE)
    except Exception as e:  # noqa: BLE001 - NotFound and friends: nothing there
        log.debug("no %s in %s: %s", path, getattr(c, "name", c), e)
    return b""


def _parse_started(text: str) -> float:
    """Docker's StartedAt (RFC 3339 with nanoseconds) as a Unix time (now when unreadable)."""
    try:
        head = text.split(".")[0].rstrip("Z")
        return datetime.datetime.fromisoformat(head).replace(
            tzinfo=datetime.UTC).timestamp()
    except ValueError:
        return time.time()
