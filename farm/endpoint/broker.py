"""The endpoint's broker: the only part of the endpoint that talks to the Docker engine
(through an `Engine`: farm/endpoint/broker_engine.py on Docker, a fake in unit tests).

The front door (farm/endpoint/server.py) faces the network unprivileged and without the
Docker socket; what needs the engine is here, in a separate container (root, the socket, no
listening port), behind a Unix socket with a narrow JSON protocol (one request line, one
answer line, each at most MAX_MESSAGE bytes):

    {"op": "hello"}                          -> {"ok": true, "version": "5.6"}
    {"op": "upstreams", "used": [names], "fresh": bool}
                                             -> {"ok": true, "upstreams": [Upstream...]}
    {"op": "still_current", "handle": h}     -> {"ok": true, "current": bool}
    {"op": "provision", "release": r, "arch": a}
                                             -> {"ok": true} | {"ok": false, "error": "..."}

The broker answers `upstreams` from a table it refreshes itself every REFRESH seconds (so the
front door never makes it call Docker per request; `fresh`, which the front door asks for when
the table proved wrong, looks again at most once per FRESH_INTERVAL), checks every provisioning request against
ENDPOINT_OFFER and the mirror's current list (cached) before any container work, provisions
one target at a time, remembers failures for FAILURE_MEMORY seconds, counts provisioned
servers under the same lock, and retires provisioned servers nobody used for
ENDPOINT_PROVISION_IDLE seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from farm.core.arch import Arch
from farm.core.errors import FarmError
from farm.endpoint.routing import Target, Upstream

log = logging.getLogger("stapfarm.broker")

MAX_MESSAGE = 1 << 20  # bytes of one request or answer line
REFRESH = 2.0  # seconds between looks at the engine
FRESH_INTERVAL = 1.0  # the shortest time between two looks a front door's `fresh` causes
LIST_TTL = 600.0  # seconds the mirror's list of releases is reused
FAILURE_MEMORY = 600.0  # seconds a failed provisioning of a target is answered from memory


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

    def upstreams(self, used: list[str], fresh: bool = False) -> list[Upstream]:
        now = self.clock()
        with self._lock:
            for name in used[:4096]:
                self._last_used[name] = now
            age = now - self._table_at
            stale = age > 4 * REFRESH or (fresh and age > FRESH_INTERVAL)
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
                fresh = message.get("fresh") is True
                return {"ok": True, "upstreams": [
                    u.to_json() for u in self.upstreams([str(n) for n in used], fresh)]}
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
