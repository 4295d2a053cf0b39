"""The farm endpoint: one TLS address for every target, routed by the request's sysinfo,
validated, and answered from a module cache.

It speaks upstream's wire protocol on both sides (stap-protocol.md §3): to the client it is a
compile server presenting the farm's certificate (the servers' own identity, so a client
trusts the farm once); to the farm's servers it is a client that pins that same certificate.

    endpoint = Endpoint(settings, directory, cache, provisioner)
    asyncio.run(endpoint.serve())          # until cancelled

What it adds to upstream's daemon:
- requests are read and checked completely before a server sees them: oversized, not-a-zip,
  unsafe names and unknown protocol versions get a response the client prints (`Server: ...`);
- per-connection handshake and read deadlines and a cap on open connections, so idle or slow
  clients cannot hold the servers' few workers (they never reach a server);
- at most `Upstream.slots` requests in flight per server (upstream's worker count), the least
  busy replica first;
- a content-addressed cache of successful responses (farm/modcache.py, key farm/wire.py);
- optional on-demand provisioning of a target nobody serves (kernel tree + server);
- Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import json
import logging
import socket
import ssl
import struct
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from farm import labels, wire
from farm.arch import Arch
from farm.container_spec import config_from_json
from farm.errors import FarmError
from farm.kernels import MANIFESTS, MOUNT
from farm.modcache import ModuleCache

log = logging.getLogger("stapfarm.endpoint")

FORWARD_TIMEOUT = 1800.0  # one compile through a server (an emulated tracepoint takes minutes)
DRAIN_CAP = 256 * 1024 * 1024  # an oversized request is read (and dropped) up to this much
REFRESH = 2.0  # seconds between routing-table refreshes (a new tree is seen within this)


@dataclass(frozen=True)
class Target:
    """What a request asks for: a kernel release and stap's architecture name."""

    release: str
    arch: str

    def __str__(self) -> str:
        return f"{self.release} {self.arch}"


@dataclass
class Upstream:
    """A running farm server the endpoint can forward to."""

    name: str
    host: str
    port: int
    arch: str  # stap name
    releases: tuple[str, ...]
    identity: str  # image, options, certificate: what besides the tree decides the result
    tree_ids: dict[str, str]  # release -> kernel tree manifest digest ("" = tree missing)
    slots: int  # requests it may build at once (its worker count)
    version: str = ""
    handle: str = ""  # the backend's id of this incarnation (container id + image)

    def serves(self, target: Target) -> bool:
        return self.arch == target.arch and target.release in self.releases


class Directory(Protocol):
    """Where the running servers are (Docker in production, a list in unit tests)."""

    def upstreams(self) -> list[Upstream]: ...

    def still_current(self, upstream: Upstream) -> bool:
        """Whether UPSTREAM still runs as listed (same container, same image): checked
        before a cached answer is given on its behalf, so a restart on another image
        between two refreshes cannot serve a stale module."""
        ...


class Provisioner(Protocol):
    """Starts a server for a target nobody serves (kernel tree first)."""

    def offers(self) -> list[Target]: ...

    def provision(self, target: Target, say: Callable[[str], None]) -> None: ...


@dataclass(frozen=True)
class Settings:
    listen: str = "0.0.0.0"
    port: int = 5100
    cert_file: str = ""  # PEM certificate chain
    key_file: str = ""  # PEM private key
    max_compressed: int = 16 * 1024 * 1024
    max_uncompressed: int = 64 * 1024 * 1024
    handshake_timeout: float = 10.0
    idle_timeout: float = 30.0  # the longest silence while reading a request
    request_timeout: float = 120.0  # the whole request must arrive within this
    max_connections: int = 256
    forward_timeout: float = FORWARD_TIMEOUT
    server_version: str = "5.6"  # for responses the endpoint writes itself
    workers: int = 64  # threads that forward and wait for builds


class Metrics:
    """The endpoint's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("stapfarm_endpoint_requests", "Requests by target and outcome "
                                "(hit, built, failed, rejected, unrouted)",
                                ["target", "outcome"], registry=r)
        self.cache_hits = Counter("stapfarm_endpoint_cache_hits", "Module cache hits",
                                  registry=r)
        self.cache_misses = Counter("stapfarm_endpoint_cache_misses", "Module cache misses",
                                    registry=r)
        self.latency = Histogram("stapfarm_endpoint_request_seconds",
                                 "Request latency (request read to response written)",
                                 ["target"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                          20, 40, 80, 160, 320, 640))
        self.queue = Gauge("stapfarm_endpoint_queue_depth",
                           "Requests waiting for a free server slot", registry=r)
        self.inflight = Gauge("stapfarm_endpoint_inflight",
                              "Requests being built by a server", registry=r)
        self.connections = Gauge("stapfarm_endpoint_connections", "Open client connections",
                                 registry=r)
        self.refused = Counter("stapfarm_endpoint_connections_refused",
                               "Connections closed at once: over the connection cap",
                               registry=r)
        self.timeouts = Counter("stapfarm_endpoint_timeouts",
                                "Connections closed for a missed deadline", ["phase"],
                                registry=r)
        self.provisioning = Counter("stapfarm_endpoint_provisioning",
                                    "On-demand provisioning events by target and outcome",
                                    ["target", "outcome"], registry=r)
        self.cache_bytes = Gauge("stapfarm_endpoint_cache_bytes", "Module cache size",
                                 registry=r)
        self.cache_entries = Gauge("stapfarm_endpoint_cache_entries",
                                   "Module cache entries", registry=r)


class Endpoint:
    """The asyncio TLS server. One instance per process."""

    def __init__(self, settings: Settings, directory: Directory, cache: ModuleCache,
                 provisioner: Provisioner | None = None, metrics: Metrics | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self.cache = cache
        self.provisioner = provisioner
        self.metrics = metrics or Metrics()
        self.ssl_context = ssl_context or server_context(settings.cert_file, settings.key_file)
        self.pinned = _cert_der(settings.cert_file) if settings.cert_file else b""
        self._pin_id = hashlib.sha256(self.pinned).hexdigest()
        self._pool = concurrent.futures.ThreadPoolExecutor(settings.workers,
                                                           thread_name_prefix="forward")
        self._busy: dict[str, int] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._open = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._provisioning: dict[Target, asyncio.Lock] = {}
        self._upstreams: list[Upstream] = []
        self._refreshed = 0.0
        self.server: asyncio.Server | None = None

    # ------------------------------------------------------------------ serving
    async def serve(self, started: threading.Event | None = None) -> None:
        s = self.settings
        self.server = await asyncio.start_server(
            self._connection, s.listen, s.port, ssl=self.ssl_context,
            ssl_handshake_timeout=s.handshake_timeout, backlog=512)
        self._update_cache_gauges()
        await self._current(force=True)
        refresher = asyncio.create_task(self._refresh_loop())
        log.info("farm endpoint listening on %s:%d", s.listen, s.port)
        if started is not None:
            started.set()
        try:
            async with self.server:
                await self.server.serve_forever()
        finally:
            refresher.cancel()
            # Stopping: hang up on the clients still connected (they retry elsewhere).
            tasks = [t for t in self._tasks if not t.done()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(refresher, *tasks, return_exceptions=True)
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _refresh_loop(self) -> None:
        """Keep the routing table fresh off the request path (servers, tree digests)."""
        while True:
            await asyncio.sleep(REFRESH)
            try:
                await self._current(force=True)
            except Exception as e:  # noqa: BLE001 - Docker hiccups: try again next time
                log.warning("cannot list the farm's servers: %s", e)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._open >= self.settings.max_connections:
            self.metrics.refused.inc()
            log.warning("refusing %s: %d connections open (ENDPOINT_MAX_CONNECTIONS)", peer,
                        self._open)
            writer.transport.abort()
            return
        self._open += 1
        self.metrics.connections.inc()
        try:
            await self._serve_one(reader, writer, peer)
        except (ConnectionError, ssl.SSLError, OSError) as e:
            log.info("connection from %s ended: %s", peer, e)
        finally:
            self._open -= 1
            self.metrics.connections.dec()
            with contextlib.suppress(Exception):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         peer: Any) -> None:
        s = self.settings
        deadline = time.monotonic() + s.request_timeout
        try:
            header = await self._read(reader, 4, deadline)
        except asyncio.IncompleteReadError:
            return  # a bare TLS probe (the client's certificate check) or a hang-up
        except TimeoutError:
            self.metrics.timeouts.labels("idle").inc()
            log.info("closing idle connection from %s", peer)
            return
        size = wire.parse_length(header)
        if size == 0:
            return  # the trust probe: close without a reply, as upstream
        if size < 0:
            await self._reply(writer, self._rejected(f"invalid request length {size}"))
            return
        if size > s.max_compressed:
            await self._drain(reader, min(size, DRAIN_CAP), deadline)
            await self._reply(writer, self._rejected(
                f"request of {size} bytes exceeds this farm's limit of {s.max_compressed} "
                "bytes compressed; make the request smaller (fewer or smaller tapset files)"))
            return
        try:
            data = await self._read(reader, size, deadline)
        except asyncio.IncompleteReadError as e:
            log.info("%s hung up after %d of %d bytes", peer, len(e.partial), size)
            return
        except TimeoutError:
            self.metrics.timeouts.labels("request").inc()
            log.info("closing %s: request not received in time", peer)
            return
        started = time.monotonic()
        try:
            response, target, outcome = await self._answer(data, peer)
        except Exception as e:  # a bug or an odd failure: answer, never drop
            log.exception("request from %s failed", peer)
            response, target, outcome = self._error(f"the farm endpoint failed: {e}"), "-", \
                "failed"
        await self._reply(writer, response)
        self.metrics.requests.labels(target, outcome).inc()
        self.metrics.latency.labels(target).observe(time.monotonic() - started)
        log.info("%s: %s for %s in %.3f s (%d bytes)", peer, outcome, target,
                 time.monotonic() - started, len(response))

    async def _read(self, reader: asyncio.StreamReader, n: int, deadline: float) -> bytes:
        """N bytes, each chunk within the idle timeout and all of them before DEADLINE."""
        chunks: list[bytes] = []
        left = n
        while left:
            timeout = min(self.settings.idle_timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(reader.read(min(left, 1 << 20)), timeout)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(chunks), n)
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    async def _drain(self, reader: asyncio.StreamReader, n: int, deadline: float) -> None:
        """Read and drop N bytes (a client blocked writing never reads our answer)."""
        left = n
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            while left > 0:
                timeout = min(self.settings.idle_timeout, deadline - time.monotonic())
                if timeout <= 0:
                    return
                chunk = await asyncio.wait_for(reader.read(min(left, 1 << 20)), timeout)
                if not chunk:
                    return
                left -= len(chunk)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    def _rejected(self, message: str, target: str = "-") -> bytes:
        log.info("rejected: %s", message)
        self.metrics.requests.labels(target, "rejected").inc()
        return wire.error_response(message, self.settings.server_version)

    # ------------------------------------------------------------------ answering
    async def _answer(self, data: bytes, peer: Any) -> tuple[bytes, str, str]:
        """The response for one complete request: (zip, target label, outcome)."""
        loop = asyncio.get_running_loop()
        try:
            request = await loop.run_in_executor(self._pool, wire.inspect_request, data,
                                                 self.settings.max_uncompressed)
        except wire.RequestError as e:
            return self._error(str(e)), "-", "rejected"
        target = Target(request.release, request.arch)
        label = str(target)
        candidates = await self._candidates(target)
        if not candidates:
            try:
                candidates = await self._provision(target)
            except FarmError as e:
                return self._error(str(e).splitlines()[0]), label, "unrouted"
        for attempt in (1, 2):
            try:
                return await self._route(request, target, candidates, data)
            except _Unreachable as e:
                # The routing table was stale (a server restarted on another port, or
                # stopped): look again once.
                log.info("%s; looking for the servers again", e)
                if attempt == 2:
                    return self._error(str(e)), label, "failed"
                candidates = await self._candidates(target, force=True)
                if not candidates:
                    return self._error(f"no server for {target.release} {target.arch} any "
                                       "more (it stopped)"), label, "unrouted"
        raise AssertionError("unreachable")

    async def _route(self, request: wire.Request, target: Target, candidates: list[Upstream],
                     data: bytes) -> tuple[bytes, str, str]:
        loop = asyncio.get_running_loop()
        label = str(target)
        missing = [u for u in candidates if not u.tree_ids.get(target.release)]
        usable = [u for u in candidates if u.tree_ids.get(target.release)]
        if not usable:
            u = missing[0]
            machine = Arch.parse(target.arch).machine
            return self._error(
                f"the kernel tree of {target.release} ({target.arch}) is missing from the "
                f"farm (server {u.name}); add it with `stap-server kernels add -a {machine} "
                f"-r {target.release}`"), label, "failed"
        # The certificate is part of what built it: a stapusr module's .ko.sgn is signed
        # with the servers' key, which a renewal replaces.
        keys = {u.name: wire.cache_key(request, _identity(u, target) + self._pin_id)
                for u in usable}
        for u in usable:  # any replica's result will do
            hit = await loop.run_in_executor(self._pool, self.cache.get, keys[u.name])
            if hit is not None:
                if not await loop.run_in_executor(self._pool, self.directory.still_current, u):
                    raise _Unreachable(f"server {u.name} changed since the last look")
                self.metrics.cache_hits.inc()
                return hit, label, "hit"
        self.metrics.cache_misses.inc()
        upstream = min(usable, key=lambda u: self._busy.get(u.name, 0) / max(u.slots, 1))
        response, built = await self._build(upstream, keys[upstream.name], data)
        if not built:
            return response, label, "hit"
        return response, label, "built" if wire.response_rc(response) == 0 else "failed"

    def _error(self, message: str) -> bytes:
        log.info("answering with an error: %s", message)
        return wire.error_response(message, self.settings.server_version)

    async def _build(self, upstream: Upstream, key: str, data: bytes) -> tuple[bytes, bool]:
        """Forward DATA to UPSTREAM (one build per key across replicas); (response, built)."""
        slots = self._slots.setdefault(upstream.name, asyncio.Semaphore(upstream.slots))
        self._busy[upstream.name] = self._busy.get(upstream.name, 0) + 1
        self.metrics.queue.inc()
        try:
            async with slots:
                self.metrics.queue.dec()
                self.metrics.inflight.inc()
                try:
                    return await asyncio.get_running_loop().run_in_executor(
                        self._pool, self._build_sync, upstream, key, data)
                finally:
                    self.metrics.inflight.dec()
        finally:
            self._busy[upstream.name] -= 1
            self._update_cache_gauges()

    def _build_sync(self, upstream: Upstream, key: str, data: bytes) -> tuple[bytes, bool]:
        with self.cache.building(key) as hit:
            if hit is not None:  # an identical request finished while this one waited
                self.metrics.cache_hits.inc()
                return hit, False
            try:
                response = forward(upstream.host, upstream.port, data, self.pinned,
                                   self.settings.forward_timeout)
            except _Unreachable:
                raise
            except FarmError as e:
                return wire.error_response(
                    f"server {upstream.name} failed: {e}", self.settings.server_version), True
            if wire.response_rc(response) == 0:
                self.cache.put(key, response)
            return response, True

    def _update_cache_gauges(self) -> None:
        st = self.cache.stats()
        self.metrics.cache_bytes.set(st.bytes)
        self.metrics.cache_entries.set(st.entries)

    # ------------------------------------------------------------------ routing
    async def _candidates(self, target: Target, force: bool = False) -> list[Upstream]:
        found = [u for u in await self._current(force) if u.serves(target)]
        if not found:  # a server may have just started: look again before giving up
            found = [u for u in await self._current(force=True) if u.serves(target)]
        return found

    async def _current(self, force: bool = False) -> list[Upstream]:
        if force or time.monotonic() - self._refreshed > 4 * REFRESH:
            loop = asyncio.get_running_loop()
            self._upstreams = await loop.run_in_executor(self._pool, self.directory.upstreams)
            self._refreshed = time.monotonic()
        return self._upstreams

    async def _provision(self, target: Target) -> list[Upstream]:
        """Start a server for TARGET if allowed; its upstreams once it answers.

        Raises:
            FarmError: provisioning is off, not offered, or failed (message for the client).
        """
        served = sorted({f"{r} {u.arch}" for u in await self._current() for r in u.releases})
        if self.provisioner is None:
            raise _NoServer(f"no server for {target.release} {target.arch}; available: "
                            f"{', '.join(served) or 'none'}")
        lock = self._provisioning.setdefault(target, asyncio.Lock())
        async with lock:  # concurrent requests for one new target wait for one server
            found = await self._candidates(target)
            if found:
                return found
            label = str(target)
            log.info("provisioning a server for %s", label)
            self.metrics.provisioning.labels(label, "started").inc()
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._pool, self.provisioner.provision, target,
                                           lambda line: log.info("provisioning %s: %s",
                                                                 label, line))
            except Exception as e:  # FarmError, or Docker/OS errors: answered
                self.metrics.provisioning.labels(label, "failed").inc()
                log.warning("provisioning %s failed: %s", label, e)
                raise _NoServer(f"no server for {target.release} {target.arch} and "
                                f"provisioning failed: {str(e).splitlines()[0]}; available: "
                                f"{', '.join(served) or 'none'}") from e
            self.metrics.provisioning.labels(label, "ready").inc()
            log.info("provisioned a server for %s", label)
            found = await self._candidates(target)
            if not found:
                raise _NoServer(f"a server for {label} was started but is not running")
            return found


class _NoServer(FarmError):
    pass


class _Unreachable(FarmError):
    """Nothing listens where the routing table says a server is (nothing was sent)."""


def _identity(u: Upstream, target: Target) -> str:
    return json.dumps({"server": u.identity, "tree": u.tree_ids.get(target.release, ""),
                       "target": [target.release, target.arch]}, sort_keys=True)


# --------------------------------------------------------------------------- TLS


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2+ with the farm's certificate; no client certificates (as stap-serverd)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _cert_der(cert_file: str) -> bytes:
    with open(cert_file) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def forward(host: str, port: int, data: bytes, pinned: bytes, timeout: float) -> bytes:
    """Send one request to a server and return its whole response (read until close).

    The server must present the certificate PINNED (DER; b"" skips the check).

    Raises:
        FarmError: connection, TLS, pinning or timeout problems.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned below: the farm's self-signed certificate
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        raw = socket.create_connection((host, port), timeout=30)
    except OSError as e:
        raise _Unreachable(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
    try:
        with raw:
            raw.settimeout(timeout)
            try:
                tls = ctx.wrap_socket(raw)
            except (OSError, ssl.SSLError) as e:  # e.g. docker-proxy resets: no server behind
                raise _Unreachable(f"no TLS handshake with {host}:{port}: {e}") from e
            with tls:
                peer = tls.getpeercert(binary_form=True) or b""
                if pinned and peer != pinned:
                    raise FarmError(f"{host}:{port} presents another certificate than the "
                                    "farm's; restart it so that it uses the farm's database")
                tls.sendall(struct.pack(">i", len(data)) + data)
                chunks = []
                while True:
                    try:
                        chunk = tls.recv(1 << 20)
                    except ssl.SSLEOFError:  # stap-serverd may close without close_notify
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
                return b"".join(chunks)
    except FarmError:
        raise
    except TimeoutError as e:
        raise FarmError(f"{host}:{port} did not answer within {timeout:.0f} s") from e
    except (OSError, ssl.SSLError) as e:
        raise FarmError(f"cannot talk to {host}:{port}: {e}") from e


# --------------------------------------------------------------------------- Docker


@dataclass
class DockerDirectory:
    """Running farm servers of PREFIX, from Docker labels; tree digests from their volume."""

    client: Any
    prefix: str
    host: str = "127.0.0.1"
    _trees: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    tree_ttl: float = 5.0

    def upstreams(self) -> list[Upstream]:
        out = []
        for c in self.client.containers.list(filters={"label": [
                f"{labels.OWNER}={self.prefix}", f"{labels.KIND}=server"],
                "status": "running"}):
            try:
                out.append(self._upstream(c))
            except Exception as e:  # noqa: BLE001 - one odd container must not stop routing
                log.warning("ignoring %s: %s", getattr(c, "name", c), e)
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
        slots = cfg.max_threads or 2
        return Upstream(name=str(c.name), host=self.host, port=port, arch=cfg.arch,
                        releases=releases, identity=identity, tree_ids=trees, slots=slots,
                        handle=f"{c.id} {image}")

    def still_current(self, upstream: Upstream) -> bool:
        container_id, _, image = upstream.handle.partition(" ")
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
        if cached and now - cached[0] < self.tree_ttl:
            return cached[1]
        digest = ""
        try:
            stream, _ = c.get_archive(f"{MOUNT}/{MANIFESTS}/{release}.json")
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                for m in tar.getmembers():
                    f = tar.extractfile(m)
                    if f is not None:
                        digest = hashlib.sha256(f.read()).hexdigest()
        except Exception as e:  # noqa: BLE001 - NotFound: the tree was removed
            log.debug("no manifest for %s in %s: %s", release, c.name, e)
        self._trees[key] = (now, digest)
        return digest


@contextlib.contextmanager
def exported_identity(db_dir: str, workdir: str) -> Iterator[tuple[str, str]]:
    """The certificate and key of the NSS database DB_DIR as PEM files (cert, key) in WORKDIR
    (a private tmpfs), removed when the block ends.

    NSS refuses to export from a read-only database, so a copy is exported (pk12util).

    Raises:
        FarmError: no database, or the export failed.
    """
    import os
    import shutil
    import subprocess
    import warnings

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    if not os.path.exists(os.path.join(db_dir, "cert9.db")):
        raise FarmError(f"no certificate database in {db_dir}; start a server first "
                        "(`stap-server start` creates it)")
    work = os.path.join(workdir, f"identity-{os.getpid()}")
    os.makedirs(work, mode=0o700, exist_ok=False)
    try:
        db = os.path.join(work, "db")
        os.mkdir(db, 0o700)
        for name in ("cert9.db", "key4.db", "pkcs11.txt"):
            if os.path.exists(os.path.join(db_dir, name)):
                shutil.copy(os.path.join(db_dir, name), db)
        pw = os.path.join(work, "pw")
        secret = os.urandom(16).hex()
        with open(pw, "w") as f:
            f.write(secret)
        p12 = os.path.join(work, "id.p12")
        run = subprocess.run(["pk12util", "-o", p12, "-n", "stap-server", "-d", f"sql:{db}",
                              "-w", pw], capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise FarmError(f"exporting the farm's key from {db_dir} failed: "
                            f"{(run.stderr or run.stdout).strip()}")
        with open(p12, "rb") as f, warnings.catch_warnings():
            # NSS writes BER (indefinite lengths); cryptography parses it and warns.
            warnings.simplefilter("ignore", UserWarning)
            key, cert, _ = pkcs12.load_key_and_certificates(f.read(), secret.encode())
        if key is None or cert is None:
            raise FarmError(f"{db_dir} holds no key and certificate named stap-server")
        shutil.rmtree(db)
        os.unlink(p12)
        cert_file = os.path.join(work, "cert.pem")
        key_file = os.path.join(work, "key.pem")
        with open(cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        yield cert_file, key_file
    finally:
        shutil.rmtree(work, ignore_errors=True)
