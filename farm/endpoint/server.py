"""The endpoint's front door: the TLS server clients talk to, unprivileged and bounded.

It speaks upstream's wire protocol on both sides (stap-protocol.md §3): to the client it is a
compile server presenting the farm's certificate; to the farm's servers it is a client that
pins each server's own certificate. What it forwards is never the client's bytes: the request
is read completely, checked by a strict reader and re-encoded from exactly the content that
was checked and keyed (farm/wire.py); the server's answer is read the same way, its module
signatures replaced by the farm's (farm/endpoint/identity.py) and re-encoded before it is
cached or sent.

    endpoint = Endpoint(settings, directory, cache, provisioner, signer)
    asyncio.run(endpoint.serve())          # until cancelled

Every bound is explicit (Settings; the global file's ENDPOINT_* variables, docs/cli.md):
connections in all and per source address, a deadline on every read and write and on the
whole connection, the request bytes held in memory at once, the requests waiting for a
build slot and how long each may wait, the size of a server's answer. Anything that goes
wrong is answered with a `Server: ...` line the client prints; internal paths, addresses and
exception texts stay in the log.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from farm.core.arch import Arch
from farm.core.errors import ArchError, FarmError
from farm.endpoint import wire
from farm.endpoint.forward import TooLarge, Unreachable, forward
from farm.endpoint.metrics import NONE, UNSERVED, Metrics
from farm.endpoint.modcache import ModuleCache
from farm.endpoint.policy import Policy
from farm.endpoint.routing import Directory, Provisioner, Target, Upstream

log = logging.getLogger("stapfarm.endpoint")

REFRESH = 2.0  # seconds between routing-table refreshes (a new tree is seen within this)
GAUGES = 30.0  # seconds between cache size scans (off the event loop)
DRAIN_CAP = 256 * 1024 * 1024  # an oversized request is read (and dropped) up to this much
INSPECTORS = 2  # requests unpacked at once (each may hold max_uncompressed bytes briefly)
WRITE_CHUNK = 1 << 16  # bytes handed to the TLS transport at a time


@dataclass(frozen=True)
class Settings:
    listen: str = "0.0.0.0"
    port: int = 5100
    cert_file: str = ""  # PEM certificate (the farm's)
    key_file: str = ""  # PEM private key (the farm's)
    max_compressed: int = 16 * 1024 * 1024
    max_uncompressed: int = 64 * 1024 * 1024
    handshake_timeout: float = 10.0
    idle_timeout: float = 30.0  # the longest silence while reading a request
    request_timeout: float = 120.0  # the whole request must arrive within this
    write_timeout: float = 60.0  # the whole answer must be taken by the client within this
    queue_timeout: float = 900.0  # the longest wait for a build slot (or for memory)
    forward_timeout: float = 1800.0  # one compile (an emulated tracepoint takes minutes)
    max_connections: int = 256
    max_per_source: int = 32
    max_queue: int = 256  # requests waiting for a build slot
    memory: int = 512 * 1024 * 1024  # request bytes held at once
    max_response: int = 64 * 1024 * 1024
    server_version: str = "5.6"  # for responses the endpoint writes itself
    workers: int = 64  # threads that forward and wait for builds
    policy: Policy = field(default_factory=Policy)

    @property
    def connection_timeout(self) -> float:
        """The whole connection: read, queue, provisioning or build, write."""
        return (self.handshake_timeout + self.request_timeout + self.queue_timeout
                + self.forward_timeout + self.write_timeout)


class ByteBudget:
    """Bytes of requests held in memory, first come first served, waits bounded by the
    caller. Used only from the event loop's thread."""

    def __init__(self, capacity: int, on_change: Callable[[int], None]) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = \
            collections.deque()
        self._on_change = on_change

    async def acquire(self, n: int, timeout: float) -> bool:
        """Reserve N bytes within TIMEOUT seconds; False when they did not become free."""
        if n > self.capacity:
            return False
        if not self._waiters and self.used + n <= self.capacity:
            self._take(n)
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if not fut.done() or fut.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()

    def adjust(self, old: int, new: int) -> None:
        """Exchange a reservation of OLD bytes for NEW (never waits; may overshoot briefly)."""
        self.used += new - old
        self._on_change(self.used)
        if new < old:
            self._wake()

    def release(self, n: int) -> None:
        self.used -= n
        self._on_change(self.used)
        self._wake()

    def _take(self, n: int) -> None:
        self.used += n
        self._on_change(self.used)

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + n > self.capacity:
                return
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)


class _Answer(Exception):
    """Stop handling a request and answer it with MESSAGE (outcome for the metrics)."""

    def __init__(self, message: str, outcome: str, label: str = NONE) -> None:
        super().__init__(message)
        self.message, self.outcome, self.label = message, outcome, label


@dataclass
class _Prepared:
    """A request after the strict reader: what routing needs, the bytes to forward."""

    request: wire.Request
    encoded: bytes


class Endpoint:
    """The asyncio TLS server. One instance per process."""

    def __init__(self, settings: Settings, directory: Directory, cache: ModuleCache,
                 provisioner: Provisioner | None = None, sign: Callable[[bytes], bytes] |
                 None = None, metrics: Metrics | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self.cache = cache
        self.provisioner = provisioner
        self.sign = sign
        self.metrics = metrics or Metrics()
        self.ssl_context = ssl_context or server_context(settings.cert_file, settings.key_file)
        farm_cert = _cert_der(settings.cert_file) if settings.cert_file else b""
        # What signs the .sgn files is part of what built an answer: a renewed farm key
        # must not serve modules signed by the old one.
        self._farm_id = hashlib.sha256(farm_cert).hexdigest()
        self._pool = concurrent.futures.ThreadPoolExecutor(settings.workers,
                                                           thread_name_prefix="forward")
        self._inspect = asyncio.Semaphore(INSPECTORS)
        self._budget = ByteBudget(settings.memory, self.metrics.held_bytes.set)
        self._busy: dict[str, int] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._waiting = 0
        self._open = 0
        self._per_source: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._provisioning = asyncio.Lock()  # one at a time, whatever the target
        self._upstreams: list[Upstream] = []
        self._used: set[str] = set()
        self._refreshed = 0.0
        self.server: asyncio.Server | None = None

    # ------------------------------------------------------------------ serving
    async def serve(self, started: threading.Event | None = None) -> None:
        s = self.settings
        self.server = await asyncio.start_server(
            self._connection, s.listen, s.port, ssl=self.ssl_context,
            ssl_handshake_timeout=s.handshake_timeout, backlog=512)
        with contextlib.suppress(Exception):  # the directory may not answer yet
            await self._current(force=True)
        loops = [asyncio.create_task(self._refresh_loop()),
                 asyncio.create_task(self._gauges_loop())]
        log.info("farm endpoint listening on %s:%d", s.listen, s.port)
        if started is not None:
            started.set()
        try:
            async with self.server:
                await self.server.serve_forever()
        finally:
            for t in loops:
                t.cancel()
            # Stopping: hang up on the clients still connected (they retry elsewhere).
            tasks = [t for t in self._tasks if not t.done()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*loops, *tasks, return_exceptions=True)
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _refresh_loop(self) -> None:
        """Keep the routing table fresh off the request path (servers, tree digests)."""
        while True:
            await asyncio.sleep(REFRESH)
            try:
                await self._current(force=True)
            except Exception as e:  # noqa: BLE001 - the broker restarting: next time
                log.warning("cannot list the farm's servers: %s", e)

    async def _gauges_loop(self) -> None:
        """The cache's size, scanned in a worker thread (a directory walk)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                st = await loop.run_in_executor(self._pool, self.cache.stats)
                self.metrics.cache_bytes.set(st.bytes)
                self.metrics.cache_entries.set(st.entries)
            except OSError as e:
                log.warning("cannot scan the module cache: %s", e)
            await asyncio.sleep(GAUGES)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        s = self.settings
        reason = ("total" if self._open >= s.max_connections else
                  "source" if self._per_source.get(source, 0) >= s.max_per_source else "")
        if reason:
            self.metrics.refused.labels(reason).inc()
            log.warning("refusing %s: %s connections open (%s)", peer,
                        self._open if reason == "total" else self._per_source[source],
                        "ENDPOINT_MAX_CONNECTIONS" if reason == "total" else
                        "ENDPOINT_MAX_PER_SOURCE")
            writer.transport.abort()
            return
        self._open += 1
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self.metrics.connections.inc()
        try:
            async with asyncio.timeout(s.connection_timeout):
                await self._serve_one(reader, writer, peer)
        except TimeoutError:
            self.metrics.timeouts.labels("connection").inc()
            log.info("closing %s: the connection outlived its deadline", peer)
            writer.transport.abort()
        except (ConnectionError, ssl.SSLError, OSError) as e:
            log.info("connection from %s ended: %s", peer, e)
        finally:
            self._open -= 1
            left = self._per_source[source] - 1
            if left:
                self._per_source[source] = left
            else:
                del self._per_source[source]
            self.metrics.connections.dec()
            if not writer.transport.is_closing():
                writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except Exception:  # noqa: BLE001 - a peer that does not take the close: drop it
                writer.transport.abort()

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
        # Reading holds the request twice for a moment (the buffer and its bytes copy).
        if not await self._budget.acquire(2 * size, s.queue_timeout):
            await self._drain(reader, size, deadline)
            self.metrics.requests.labels(NONE, "busy").inc()
            await self._reply(writer, self._error(
                "the farm is busy (too many large requests at once); try again shortly"))
            return
        held = 2 * size
        try:
            try:
                data = await self._read(reader, size, deadline)
            except asyncio.IncompleteReadError as e:
                log.info("%s hung up after %d of %d bytes", peer, len(e.partial), size)
                return
            except TimeoutError:
                self.metrics.timeouts.labels("request").inc()
                log.info("closing %s: request not received in time", peer)
                return
            self._budget.adjust(held, size)
            held = size
            started = time.monotonic()
            try:
                prepared = await self._prepare(data)
                del data
                self._budget.adjust(held, len(prepared.encoded))
                held = len(prepared.encoded)
                response, label, outcome = await self._answer(prepared)
            except _Answer as a:
                response, label, outcome = self._error(a.message), a.label, a.outcome
            except Exception:  # a bug or an odd failure: answer, never drop
                incident = uuid.uuid4().hex[:8]
                log.exception("request from %s failed (incident %s)", peer, incident)
                response, label, outcome = self._error(
                    f"the farm endpoint failed on this request (incident {incident} in its "
                    "log)"), NONE, "failed"
        finally:
            self._budget.release(held)
        await self._reply(writer, response)
        took = time.monotonic() - started
        self.metrics.requests.labels(label, outcome).inc()
        self.metrics.latency.labels(label).observe(took)
        log.info("%s: %s for %s in %.3f s (%d bytes)", peer, outcome, label, took,
                 len(response))

    async def _read(self, reader: asyncio.StreamReader, n: int, deadline: float) -> bytes:
        """N bytes, each chunk within the idle timeout and all of them before DEADLINE."""
        buf = bytearray()
        while len(buf) < n:
            timeout = min(self.settings.idle_timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(reader.read(min(n - len(buf), 1 << 20)), timeout)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(buf), n)
            buf += chunk
        return bytes(buf)

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

    async def _reply(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Send DATA and end the stream; a client that does not take it within the write
        deadline is cut off (its buffered answer is dropped with the transport).

        Written in chunks: asyncio's TLS transport hands one large write to the socket
        transport whole, so only a chunk at a time lets drain() wait for the client."""
        try:
            async with asyncio.timeout(self.settings.write_timeout):
                for i in range(0, len(data), WRITE_CHUNK):
                    writer.write(data[i:i + WRITE_CHUNK])
                    await writer.drain()
        except TimeoutError:
            self.metrics.timeouts.labels("write").inc()
            log.info("cutting off %s: it did not read its answer within %.0f s",
                     writer.get_extra_info("peername"), self.settings.write_timeout)
            writer.transport.abort()
            return
        if writer.can_write_eof():
            writer.write_eof()

    def _rejected(self, message: str) -> bytes:
        log.info("rejected: %s", message)
        self.metrics.requests.labels(NONE, "rejected").inc()
        return wire.error_response(message, self.settings.server_version)

    def _error(self, message: str) -> bytes:
        log.info("answering with an error: %s", message)
        return wire.error_response(message, self.settings.server_version)

    # ------------------------------------------------------------------ answering
    async def _prepare(self, data: bytes) -> _Prepared:
        """The strict reading of DATA and its re-encoding, in a worker thread.

        Raises:
            _Answer: the request is refused (the reader's or the policy's line).
        """
        loop = asyncio.get_running_loop()
        async with self._inspect:
            try:
                request = await loop.run_in_executor(
                    self._pool, wire.inspect_request, data, self.settings.max_uncompressed)
            except wire.RequestError as e:
                raise _Answer(str(e), "rejected") from e
            refusal = self.settings.policy.refusal(request.argv)
            if refusal:
                raise _Answer(refusal, "rejected")
            if not Target(request.release, request.arch).well_formed:
                raise _Answer("the request's kernel release is longer than this farm "
                              "accepts; check stap's -r", "rejected")
            encoded = await loop.run_in_executor(self._pool, wire.encode_request, request)
        return _Prepared(request, encoded)

    async def _answer(self, p: _Prepared) -> tuple[bytes, str, str]:
        """The response for one checked request: (zip, target label, outcome).

        Raises:
            _Answer: no server, provisioning refused or failed, the server unreachable.
        """
        target = Target(p.request.release, p.request.arch)
        candidates = await self._candidates(target)
        if not candidates:
            candidates = await self._provision(target)
        label = str(target)
        for attempt in (1, 2):
            try:
                return await self._route(p, target, candidates)
            except Unreachable as e:
                # The routing table was stale (a server restarted on another port, or
                # stopped): look again once.
                log.info("%s; looking for the servers again", e)
                if attempt == 2:
                    raise _Answer(f"the compile server for {target} does not answer; try "
                                  "again shortly", "failed", label) from e
                candidates = await self._candidates(target, force=True)
                if not candidates:
                    raise _Answer(f"no server for {target} any more (it stopped)",
                                  "unrouted", label) from e
        raise AssertionError("unreachable")

    async def _route(self, p: _Prepared, target: Target,
                     candidates: list[Upstream]) -> tuple[bytes, str, str]:
        loop = asyncio.get_running_loop()
        label = str(target)
        self._used.update(u.name for u in candidates)  # a request for them: not idle
        usable = [u for u in candidates if u.tree_ids.get(target.release)]
        if not usable:
            try:
                machine = Arch.parse(target.arch).machine
            except ArchError:
                machine = target.arch
            raise _Answer(f"the kernel tree of {target.release} ({target.arch}) is missing "
                          f"from the farm; its operator can add it with `stap-server kernels "
                          f"add -a {machine} -r {target.release}`", "failed", label)
        keys = await loop.run_in_executor(self._pool, self._keys, p.request, target, usable)
        for u in usable:  # any replica's result will do
            hit = await loop.run_in_executor(self._pool, self._cache_get, keys[u.name])
            if hit is not None:
                current = await loop.run_in_executor(self._pool, self.directory.still_current,
                                                     u)
                if not current:
                    raise Unreachable(f"server {u.name} changed since the last look")
                self.metrics.cache_hits.inc()
                return hit, label, "hit"
        self.metrics.cache_misses.inc()
        upstream = min(usable, key=lambda u: self._busy.get(u.name, 0) / max(u.slots, 1))
        response, built = await self._build(upstream, keys[upstream.name], p.encoded, target)
        if not built:
            return response, label, "hit"
        return response, label, "built" if wire.response_rc(response) == 0 else "failed"

    def _keys(self, request: wire.Request, target: Target,
              usable: list[Upstream]) -> dict[str, str]:
        return {u.name: wire.cache_key(request, _identity(u, target) + self._farm_id)
                for u in usable}

    def _cache_get(self, key: str) -> bytes | None:
        """KEY's cached answer; a cache that cannot be read is a miss (logged, counted)."""
        try:
            return self.cache.get(key)
        except OSError as e:
            self.metrics.cache_errors.labels("read").inc()
            log.warning("module cache read failed (answering as a miss): %s", e)
            return None

    async def _build(self, upstream: Upstream, key: str, data: bytes,
                     target: Target) -> tuple[bytes, bool]:
        """Forward DATA to UPSTREAM (one build per key across replicas); (response, built).

        Raises:
            _Answer: the queue is full or the wait for a slot outlived its deadline.
        """
        s = self.settings
        if self._waiting >= s.max_queue:
            raise _Answer(f"the farm is busy ({self._waiting} requests waiting for a compile "
                          "server); try again shortly", "busy", str(target))
        slots = self._slots.setdefault(upstream.name, asyncio.Semaphore(upstream.slots))
        self._busy[upstream.name] = self._busy.get(upstream.name, 0) + 1
        self._waiting += 1
        self.metrics.queue.inc()
        waiting = True
        try:
            try:
                await asyncio.wait_for(slots.acquire(), s.queue_timeout)
            except TimeoutError as e:
                raise _Answer(f"the farm is busy: no compile server for {target} was free "
                              f"within {s.queue_timeout:.0f} s; try again later", "busy",
                              str(target)) from e
            self._waiting -= 1
            self.metrics.queue.dec()
            waiting = False
            self.metrics.inflight.inc()
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._build_sync, upstream, key, data, target)
            finally:
                self.metrics.inflight.dec()
                slots.release()
        finally:
            if waiting:
                self._waiting -= 1
                self.metrics.queue.dec()
            self._busy[upstream.name] -= 1

    def _build_sync(self, upstream: Upstream, key: str, data: bytes,
                    target: Target) -> tuple[bytes, bool]:
        response: bytes | None = None
        try:
            with self.cache.building(key) as hit:
                if hit is not None:  # an identical request finished while this one waited
                    self.metrics.cache_hits.inc()
                    return hit, False
                response = self._forward(upstream, data, target)
                if wire.response_rc(response) == 0:
                    try:
                        self.cache.put(key, response)
                    except OSError as e:
                        self.metrics.cache_errors.labels("write").inc()
                        log.warning("module cache write failed (answer sent uncached): %s", e)
                return response, True
        except OSError as e:  # the cache's lock files (_forward raises no OSError)
            self.metrics.cache_errors.labels("lock").inc()
            log.warning("module cache lock failed (building uncached): %s", e)
            if response is None:
                response = self._forward(upstream, data, target)
            return response, True

    def _forward(self, upstream: Upstream, data: bytes, target: Target) -> bytes:
        """UPSTREAM's answer to DATA, checked and re-encoded, the farm's signatures in it.

        Raises:
            Unreachable: nothing listens there (nothing was sent).
        """
        s = self.settings
        try:
            raw = forward(upstream.host, upstream.port, data, upstream.pin, s.forward_timeout,
                          s.max_response)
        except Unreachable:
            raise
        except TooLarge:
            log.warning("%s answered more than %d bytes", upstream.name, s.max_response)
            return self._error(f"the compile server's answer for {target} is larger than "
                               f"this farm's limit of {s.max_response} bytes")
        except FarmError as e:
            log.warning("%s failed: %s", upstream.name, e)
            return self._error(f"the compile server for {target} failed ({_short(e)}); see "
                               "the farm's logs")
        if not raw:
            return self._error(f"the compile server for {target} closed the connection "
                               "without an answer; see the farm's logs")
        try:
            response = wire.inspect_response(raw, s.max_response)
        except wire.ResponseError as e:
            log.warning("%s sent an answer the endpoint refuses: %s", upstream.name, e)
            return self._error(f"the compile server for {target} sent a malformed answer")
        if self.sign is not None:
            response = wire.replace_signatures(response, self.sign)
        return wire.encode_response(response)

    # ------------------------------------------------------------------ routing
    async def _candidates(self, target: Target, force: bool = False) -> list[Upstream]:
        found = [u for u in await self._current(force) if u.serves(target)]
        if not found and not force:  # a server may have just started: look again
            found = [u for u in await self._current(force=True) if u.serves(target)]
        return found

    async def _current(self, force: bool = False) -> list[Upstream]:
        if force or time.monotonic() - self._refreshed > 4 * REFRESH:
            used, self._used = frozenset(self._used), set()
            loop = asyncio.get_running_loop()
            try:
                self._upstreams = await loop.run_in_executor(
                    self._pool, lambda: self.directory.upstreams(used))
            except Exception:
                self._used |= used  # reported next time
                raise
            self._refreshed = time.monotonic()
        return self._upstreams

    def _served(self) -> str:
        return ", ".join(sorted({f"{r} {u.arch}" for u in self._upstreams
                                 for r in u.releases})) or "none"

    async def _provision(self, target: Target) -> list[Upstream]:
        """Start a server for TARGET if the provisioner agrees; its upstreams once it answers.

        Raises:
            _Answer: provisioning is off, refused or failed (the line for the client).
        """
        if self.provisioner is None:
            raise _Answer(f"no server for {target}; available: {self._served()}",
                          "unrouted", UNSERVED)
        provisioner = self.provisioner
        async with self._provisioning:  # one at a time: later ones find its server
            found = await self._candidates(target, force=True)
            if found:
                return found
            log.info("provisioning a server for %s", target)
            self.metrics.provisioning.labels("started").inc()
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._pool, provisioner.provision, target,
                                           lambda line: log.info("provisioning %s: %s",
                                                                 target, line))
            except FarmError as e:
                self.metrics.provisioning.labels("failed").inc()
                log.warning("provisioning %s failed: %s", target, e)
                raise _Answer(f"no server for {target} ({str(e).splitlines()[0]}); "
                              f"available: {self._served()}", "unrouted", UNSERVED) from e
            self.metrics.provisioning.labels("ready").inc()
            log.info("provisioned a server for %s", target)
            found = await self._candidates(target, force=True)
            if not found:
                raise _Answer(f"a server for {target} was started but is not running",
                              "unrouted", UNSERVED)
            return found


def _short(error: BaseException) -> str:
    """A reason for the client without addresses: the last clause of the message."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text.rsplit(": ", 1)[-1][:80] if "did not answer" not in text else "timed out"


def _identity(u: Upstream, target: Target) -> str:
    return json.dumps({"server": u.identity, "tree": u.tree_ids.get(target.release, ""),
                       "target": [target.release, target.arch]}, sort_keys=True)


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2+ with the farm's certificate; no client certificates (as stap-serverd)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _cert_der(cert_file: str) -> bytes:
    with open(cert_file) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())
