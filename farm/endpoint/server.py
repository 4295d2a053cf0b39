"""The endpoint's front door: the TLS server clients talk to, unprivileged and bounded.

It speaks upstream's wire protocol on both sides (stap-protocol.md §3): to the client it is a
compile server presenting the farm's certificate; to the farm's servers it is a client that
pins each server's own certificate. This module is the connection side: it accepts, caps and
times connections, reads each request completely within the memory budget, and writes the
answer back. What to answer is the router's (farm/endpoint/router.py): the request is
checked by a strict reader and re-encoded from exactly the content that was checked and
keyed (farm/endpoint/wire.py), so what is forwarded is never the client's bytes; the
server's answer is read the same way, its module signatures replaced by the farm's
(farm/endpoint/identity.py) and re-encoded before it is cached or sent.

    endpoint = Endpoint(settings, directory, cache, provisioner, signer)
    asyncio.run(endpoint.serve())          # until cancelled

Every bound is explicit (Settings, farm/endpoint/settings.py; the global file's ENDPOINT_*
variables, docs/cli.md): connections in all and per source address, a deadline on every read
and write and on the whole connection, the request bytes held in memory at once, the
requests waiting for a build slot and how long each may wait, the size of a server's answer.
Anything that goes wrong is answered with a `Server: ...` line the client prints; internal
paths, addresses and exception texts stay in the log.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from farm.endpoint import wire
from farm.endpoint.answers import error_answer
from farm.endpoint.metrics import NONE, Metrics
from farm.endpoint.modcache import ModuleCache
from farm.endpoint.router import Answer, Router
from farm.endpoint.routing import Directory, Provisioner
from farm.endpoint.settings import Settings

# Settings (farm/endpoint/settings.py) too: what every caller of Endpoint builds.
__all__ = ["ByteBudget", "Endpoint", "Settings", "server_context"]

log = logging.getLogger("stapfarm.endpoint")

DRAIN_CAP = 256 * 1024 * 1024  # an oversized request is read (and dropped) up to this much
WRITE_CHUNK = 1 << 16  # bytes handed to the TLS transport at a time


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


class Endpoint:
    """The asyncio TLS server. One instance per process."""

    def __init__(self, settings: Settings, directory: Directory, cache: ModuleCache,
                 provisioner: Provisioner | None = None, sign: Callable[[bytes], bytes] |
                 None = None, metrics: Metrics | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.ssl_context = ssl_context or server_context(settings.cert_file, settings.key_file)
        farm_cert = _cert_der(settings.cert_file) if settings.cert_file else b""
        # What signs the .sgn files is part of what built an answer: a renewed farm key
        # must not serve modules signed by the old one.
        farm_id = hashlib.sha256(farm_cert).hexdigest()
        self._pool = concurrent.futures.ThreadPoolExecutor(settings.workers,
                                                           thread_name_prefix="forward")
        self.router = Router(settings, directory, cache, provisioner, sign, self.metrics,
                             self._pool, farm_id)
        self._budget = ByteBudget(settings.memory, self.metrics.held_bytes.set)
        self._open = 0
        self._per_source: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None

    # ------------------------------------------------------------------ serving
    async def serve(self, started: threading.Event | None = None) -> None:
        s = self.settings
        self.server = await asyncio.start_server(
            self._connection, s.listen, s.port, ssl=self.ssl_context,
            ssl_handshake_timeout=s.handshake_timeout, backlog=512)
        with contextlib.suppress(Exception):  # the directory may not answer yet
            await self.router.current(force=True)
        loops = [asyncio.create_task(self.router.refresh_loop()),
                 asyncio.create_task(self.router.gauges_loop())]
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
                prepared = await self.router.prepare(data)
                del data
                self._budget.adjust(held, len(prepared.encoded))
                held = len(prepared.encoded)
                response, label, outcome = await self.router.answer(prepared)
            except Answer as a:
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
        return error_answer(message, self.settings.server_version)


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2+ with the farm's certificate; no client certificates (as stap-serverd)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _cert_der(cert_file: str) -> bytes:
    with open(cert_file) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())
