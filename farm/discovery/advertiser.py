"""The advertiser: follows the farm's server containers and publishes them over mDNS.

Docker events (filtered by the farm's owner label) wake it, a periodic resync catches what
events miss, and an engine that goes away is reconnected to and resynced. Each running server
is advertised once it answers TLS on its published port: certinfo comes from the live
certificate, the systemtap version from `stap -V` in the server's image (once per image).
Records are farm.discovery.mdns's; the sockets are farm.discovery.publisher's.

    python3 -m farm.discovery.advertiser --prefix stapfarm [--interface IFACE_OR_ADDRESS]...
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Self

from farm.core import labels
from farm.core.errors import FarmError, ServerError
from farm.discovery import mdns
from farm.discovery.mdns import Changes, ObservedServer, Service, ServiceKey
from farm.discovery.publisher import ZeroconfPublisher, host_interfaces
from farm.engine.docker import Engine, started_at
from farm.trust import tls as tlsprobe

log = logging.getLogger("farm.discovery.advertiser")

RESYNC_INTERVAL = 5.0  # seconds between full resyncs when nothing happens
FAST_RETRY = 0.25  # seconds between tries while a server has not answered TLS yet
FAST_WINDOW = 600.0  # how long after a server's start it is retried that often
NAME_REUSE_DELAY = 1.2  # goodbyes keep a name in caches for 1 s (RFC 6762 §10.1)
RECONNECT_DELAY = 1.0


class Publisher(Protocol):
    def open(self) -> None: ...
    def apply(self, changes: Changes) -> None: ...
    def published(self) -> dict[ServiceKey, str]: ...
    def others(self) -> set[str]: ...
    def withdraw_all(self) -> None: ...
    def close(self) -> None: ...


def _default_publisher(addresses: list[str]) -> Publisher:
    return ZeroconfPublisher(addresses)


def _default_interfaces() -> Mapping[str, Sequence[str]]:
    return host_interfaces()


class Advertiser:
    """Publishes every running server container of PREFIX as `_stap._tcp` services.

    Construction only records settings; start() resolves the interfaces, opens the sockets
    and starts two threads (events, resync); close() withdraws everything (goodbyes).
    """

    def __init__(self, connect: Callable[[], Engine], prefix: str,
                 interfaces: Sequence[str] = (), probe_address: str = "127.0.0.1", *,
                 resync_interval: float = RESYNC_INTERVAL,
                 publisher: Callable[[list[str]], Publisher] = _default_publisher,
                 host_interfaces: Callable[[], Mapping[str, Sequence[str]]] =
                 _default_interfaces,
                 probe: Callable[..., Any] = tlsprobe.probe,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.prefix = prefix
        self.interfaces = tuple(interfaces)
        self.probe_address = probe_address
        self.resync_interval = resync_interval
        self._connect = connect
        self._publisher_factory = publisher
        self._host_interfaces = host_interfaces
        self._probe = probe
        self._clock = clock
        self.addresses: list[str] = []
        self._pub: Publisher | None = None
        self._client: Any = None
        self._stream: Any = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._published: dict[ServiceKey, Service] = {}
        self._deferred: dict[ServiceKey, str] = {}
        self._withdrawn: dict[str, float] = {}  # lowercase name -> when we withdrew it
        self._certs: dict[tuple[str, str], str] = {}  # (container, StartedAt) -> certinfo
        self._first_seen: dict[tuple[str, str], float] = {}
        self._versions: dict[str, str] = {}  # image id -> systemtap version
        self._tree_releases: dict[tuple[str, str, str], str] = {}
        self.engine_up = False

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Resolve the interfaces and open the mDNS sockets (no threads: see start()).

        Raises:
            ConfigError: the interfaces cannot be resolved on this host.
        """
        self.addresses = mdns.choose_addresses(self.interfaces, self._host_interfaces())
        self._pub = self._publisher_factory(self.addresses)
        self._pub.open()
        log.info("advertising the servers of '%s' on %s", self.prefix,
                 ", ".join(self.addresses))

    def start(self) -> None:
        """open(), then follow Docker in the background.

        Raises:
            ConfigError: the interfaces cannot be resolved on this host.
        """
        self.open()
        self._stop.clear()
        self._threads = [threading.Thread(target=self._resync_loop, name="mdns-resync",
                                          daemon=True),
                         threading.Thread(target=self._events_loop, name="mdns-events",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop following Docker and withdraw every service (goodbye packets)."""
        self._stop.set()
        self._wake.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):  # closing a broken stream is best effort
                stream.close_events()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        if self._pub is not None:
            self._pub.close()
            self._pub = None
        self._published.clear()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def published(self) -> dict[ServiceKey, Service]:
        """What is advertised now, by (server id, release)."""
        return dict(self._published)

    # ------------------------------------------------------------------ threads
    def _resync_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            delay = self.resync()
            self._wake.wait(delay)

    def _events_loop(self) -> None:
        while not self._stop.is_set():
            engine = None
            try:
                engine = self._connect()
                self._stream = engine
                self._wake.set()  # (re)connected: resync now
                for _event in engine.events("server"):
                    self._wake.set()
                    if self._stop.is_set():
                        break
            except Exception as e:  # noqa: BLE001 - the engine went away: reconnect below
                if not self._stop.is_set():
                    log.warning("Docker events interrupted (%s); reconnecting", e)
            finally:
                self._stream = None
                if engine is not None:
                    with contextlib.suppress(Exception):  # best effort
                        engine.close()
            self._wake.set()
            self._stop.wait(RECONNECT_DELAY)

    # ------------------------------------------------------------------ one pass
    def resync(self) -> float:
        """Bring the published services in line with the running servers; never raises.
        Returns how long to wait before the next pass."""
        pub = self._pub
        if pub is None:
            return self.resync_interval
        try:
            if self._client is None:
                self._client = self._connect()
            servers, pending = self._observe(self._client)
            if not self.engine_up:
                log.info("Docker engine reachable: resyncing")
            self.engine_up = True
        except Exception as e:  # noqa: BLE001 - engine down or restarting
            if self.engine_up or self._published:
                log.warning("Docker engine unreachable (%s): withdrawing every service", e)
            self.engine_up = False
            self._client = None
            self._withdraw_all(pub)
            return RECONNECT_DELAY
        try:
            deferred = self._publish(pub, servers)
        except Exception as e:  # noqa: BLE001 - never crash: log and retry
            log.error("publishing failed: %s", e)
            return RECONNECT_DELAY
        return FAST_RETRY if pending or deferred else self.resync_interval

    def _publish(self, pub: Publisher, servers: list[ObservedServer]) -> bool:
        now = self._clock()
        self._withdrawn = {n: t for n, t in self._withdrawn.items()
                           if now - t < NAME_REUSE_DELAY}
        recent = set(self._withdrawn)
        previous = {k: s.name for k, s in self._published.items()}
        previous.update(self._deferred)
        wanted = mdns.assign_names(mdns.services(servers), previous,
                                   taken=pub.others() - recent)
        changes = mdns.diff(self._published.values(), wanted)
        recent |= {s.name.lower() for s in changes.remove}
        adds = tuple(s for s in changes.add if s.name.lower() not in recent)
        self._deferred = {s.key: s.name for s in changes.add if s.name.lower() in recent}
        if changes:
            pub.apply(Changes(remove=changes.remove, add=adds, update=changes.update))
        for s in changes.remove:
            self._withdrawn[s.name.lower()] = now
        live = pub.published()
        self._published = {s.key: s for s in wanted
                           if s.key in live and s.key not in self._deferred}
        return bool(self._deferred) or len(self._published) < len(wanted)

    def _withdraw_all(self, pub: Publisher) -> None:
        if not self._published:
            return
        try:
            pub.withdraw_all()
        except Exception as e:  # noqa: BLE001 - never crash
            log.error("withdrawing failed: %s", e)
        now = self._clock()
        for s in self._published.values():
            self._withdrawn[s.name.lower()] = now
        self._published = {}

    # ------------------------------------------------------------------ Docker
    def _observe(self, engine: Engine) -> tuple[list[ObservedServer], bool]:
        """The running servers that answer TLS, and whether some are still starting."""
        containers = engine.containers("server", running=True)
        servers: list[ObservedServer] = []
        pending = False
        runs = set()
        now = self._clock()
        for c in containers:
            run = (str(c.id), started_at(c))
            runs.add(run)
            self._first_seen.setdefault(run, now)
            try:
                server = self._server(engine, c, run)
            except ServerError as e:
                if now - self._first_seen[run] < FAST_WINDOW:
                    pending = True
                log.debug("%s not advertised yet: %s", c.name, e)
                continue
            if server is not None:
                servers.append(server)
        endpoint = self._endpoint(engine, runs)
        if endpoint is not None and servers:
            servers = mdns.endpoint_view(servers, **endpoint)
        for cache in (self._certs, self._first_seen):
            for run in [r for r in cache if r not in runs]:
                del cache[run]
        self._tree_releases = {k: v for k, v in self._tree_releases.items()
                               if (k[0], k[1]) in runs}
        return servers, pending

    def _endpoint(self, engine: Engine, runs: set[tuple[str, str]]) -> dict[str, Any] | None:
        """The running farm endpoint of the prefix, as mdns.endpoint_view's arguments (None
        when there is none, or it does not answer TLS yet)."""
        found = engine.containers("endpoint", running=True)
        if not found:
            return None
        c = found[0]
        port = int(c.labels.get(labels.PORT, "0") or 0)
        run = (str(c.id), started_at(c))
        runs.add(run)
        cert = self._certs.get(run)
        if cert is None:
            try:
                x509 = self._probe(self.probe_address, port, timeout=2.0)
            except ServerError as e:
                log.debug("the endpoint does not answer yet: %s", e)
                return None
            cert = tlsprobe.certinfo(int(x509.get_serial_number()))
            self._certs[run] = cert
            self._first_seen.setdefault(run, self._clock())
        offers = []
        for word in c.labels.get(labels.OFFERS, "").split():
            arch, _, rel = word.partition(":")
            if rel:
                offers.append((arch, rel))
        return {"endpoint_id": str(c.name), "port": port, "certinfo": cert, "offers": offers}

    def _server(self, engine: Engine, c: Any, run: tuple[str, str]) -> ObservedServer | None:
        """What to advertise for container C.

        Raises:
            ServerError: it does not answer TLS yet, or its version cannot be read yet.
        """
        attrs = c.attrs
        config = attrs.get("Config") or {}
        args = mdns.parse_daemon_args([str(a) for a in config.get("Cmd") or []])
        port = int(c.labels.get(labels.PORT, "0") or 0)
        if not port or not args.arch:
            log.warning("%s has no published port or -a option: not advertised", c.name)
            return None
        cert = self._certs.get(run)
        if cert is None:
            x509 = self._probe(self.probe_address, port, timeout=2.0)
            cert = tlsprobe.certinfo(int(x509.get_serial_number()))
            self._certs[run] = cert
        version = self._version(engine, c, str(attrs.get("Image", "")))
        releases = tuple(self._release(engine, c, run, r) for r in args.releases)
        return ObservedServer(server_id=str(c.name), host=str(config.get("Hostname", "")),
                              port=port, arch=args.arch, releases=releases,
                              optinfo=args.optinfo, version=version, certinfo=cert)

    @staticmethod
    def _exec(engine: Engine, c: Any, cmd: list[str]) -> str:
        code, text = engine.exec(c, cmd)  # ServerError: retried on the next pass
        if code != 0:
            raise ServerError(f"`{' '.join(cmd)}` in {c.name} exited {code}: {text.strip()}")
        return text

    def _version(self, engine: Engine, c: Any, image: str) -> str:
        if image not in self._versions:
            try:
                self._versions[image] = mdns.parse_stap_version(self._exec(engine, c,
                                                                            ["stap", "-V"]))
            except ValueError as e:
                raise ServerError(str(e)) from e
        return self._versions[image]

    def _release(self, engine: Engine, c: Any, run: tuple[str, str], release: str) -> str:
        """RELEASE, or the release of the build tree it names (`-r /path`, as upstream)."""
        if not release.startswith("/"):
            return release
        key = (run[0], run[1], release)
        if key not in self._tree_releases:
            text = self._exec(engine, c, ["cat", f"{release}/include/config/kernel.release"])
            self._tree_releases[key] = text.strip()
        return self._tree_releases[key]


# --------------------------------------------------------------------------- foreground


def run_foreground(advertiser: Advertiser, stop: threading.Event | None = None) -> None:
    """Run ADVERTISER until STOP is set (or SIGINT/SIGTERM when STOP is None)."""
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    advertiser.start()
    try:
        stop.wait()
    finally:
        advertiser.close()


def configure_logging(stream: Any = None, level: int = logging.INFO) -> None:
    """Log the advertiser's lines to STREAM (replacing an earlier call's handler)."""
    for old in [h for h in log.handlers if getattr(h, "_farm", False)]:
        log.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._farm = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%b %d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """`python3 -m farm.discovery.advertiser`: the advertiser container's command."""
    p = argparse.ArgumentParser(prog="farm.discovery.advertiser",
                                description="Advertise the farm's servers over mDNS.")
    p.add_argument("--prefix", default="stapfarm", help="the farm's owner label")
    p.add_argument("--interface", action="append", default=[],
                   help="interface name or IPv4 address (default: every LAN interface)")
    p.add_argument("--probe-address", default="127.0.0.1",
                   help="where the servers' published ports answer")
    p.add_argument("--resync", type=float, default=RESYNC_INTERVAL, help="seconds")
    p.add_argument("--debug", action="store_true")
    ns = p.parse_args(argv)
    configure_logging(level=logging.DEBUG if ns.debug else logging.INFO)
    adv = Advertiser(lambda: Engine.connect(prefix=ns.prefix), ns.prefix, ns.interface,
                     ns.probe_address,
                     resync_interval=ns.resync)
    try:
        run_foreground(adv)
    except FarmError as e:
        log.error("stap-server mdns: %s", e)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
