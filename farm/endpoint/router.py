"""The endpoint's answering side: a request in, read strictly; its response zip out.

`Endpoint` (farm/endpoint/server.py) hands every request it has read in full to a `Router`:

    prepared = await router.prepare(data)      # Answer: refused, with the client's line
    response, label, outcome = await router.answer(prepared)

`prepare` reads the request with the strict reader and re-encodes it (farm/endpoint/wire.py),
so what is forwarded is exactly what was checked and keyed; `answer` finds the servers for
its target in the routing table (kept fresh by `refresh_loop`, from a `Directory`), has a
`Provisioner` start one when there is none, answers from the module cache
(farm/endpoint/modcache.py) when it can, and otherwise waits for a build slot on the least
busy replica (one build per cache key) and relays the request there
(farm/endpoint/answers.py: the server's answer checked, signed by the farm, re-encoded)
before caching a successful answer. Blocking work runs in the thread pool it is given; the
rest only on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from farm.core.arch import Arch
from farm.core.errors import ArchError, FarmError
from farm.endpoint import wire
from farm.endpoint.answers import relay
from farm.endpoint.forward import Unreachable
from farm.endpoint.metrics import NONE, UNSERVED, Metrics
from farm.endpoint.modcache import ModuleCache
from farm.endpoint.routing import Directory, Provisioner, Target, Upstream
from farm.endpoint.settings import Settings

log = logging.getLogger("stapfarm.endpoint")

REFRESH = 2.0  # seconds between routing-table refreshes (a new tree is seen within this)
GAUGES = 30.0  # seconds between cache size scans (off the event loop)
INSPECTORS = 2  # requests unpacked at once (each may hold max_uncompressed bytes briefly)


class Answer(Exception):
    """Stop handling a request and answer it with MESSAGE (outcome for the metrics)."""

    def __init__(self, message: str, outcome: str, label: str = NONE) -> None:
        super().__init__(message)
        self.message, self.outcome, self.label = message, outcome, label


@dataclass
class Prepared:
    """A request after the strict reader: what routing needs, the bytes to forward. Its
    files are not kept (only their digest): a waiting request holds its encoded bytes once,
    which is what the endpoint's memory budget counts."""

    request: wire.Request  # files and dirs emptied
    digest: bytes  # wire.request_digest of the full request
    encoded: bytes


class Router:
    """Routing, caching and building for the endpoint. One per `Endpoint`."""

    def __init__(self, settings: Settings, directory: Directory, cache: ModuleCache,
                 provisioner: Provisioner | None, sign: Callable[[bytes], bytes] | None,
                 metrics: Metrics, pool: concurrent.futures.ThreadPoolExecutor,
                 farm_id: str) -> None:
        self.settings = settings
        self.directory = directory
        self.cache = cache
        self.provisioner = provisioner
        self.sign = sign
        self.metrics = metrics
        self._pool = pool
        self._farm_id = farm_id  # part of every cache key (see `Endpoint`)
        self._inspect = asyncio.Semaphore(INSPECTORS)
        self._busy: dict[str, int] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._waiting = 0
        self._provisioning = asyncio.Lock()  # one at a time, whatever the target
        self._upstreams: list[Upstream] = []
        self._used: set[str] = set()
        self._refreshed = 0.0

    # ------------------------------------------------------------------ background
    async def refresh_loop(self) -> None:
        """Keep the routing table fresh off the request path (servers, tree digests)."""
        while True:
            await asyncio.sleep(REFRESH)
            try:
                await self.current(force=True)
            except Exception as e:  # noqa: BLE001 - the broker restarting: next time
                log.warning("cannot list the farm's servers: %s", e)

    async def gauges_loop(self) -> None:
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

    # ------------------------------------------------------------------ answering
    async def prepare(self, data: bytes) -> Prepared:
        """The strict reading of DATA and its re-encoding, in a worker thread.

        Raises:
            Answer: the request is refused (the reader's or the policy's line).
        """
        loop = asyncio.get_running_loop()
        async with self._inspect:
            try:
                request = await loop.run_in_executor(
                    self._pool, wire.inspect_request, data, self.settings.max_uncompressed)
            except wire.RequestError as e:
                raise Answer(str(e), "rejected") from e
            refusal = self.settings.policy.refusal(request.argv)
            if refusal:
                raise Answer(refusal, "rejected")
            if not Target(request.release, request.arch).well_formed:
                raise Answer("the request's kernel release is longer than this farm "
                             "accepts; check stap's -r", "rejected")
            encoded, digest = await loop.run_in_executor(self._pool, _encode, request)
        return Prepared(dataclasses.replace(request, files=(), dirs=()), digest, encoded)

    async def answer(self, p: Prepared) -> tuple[bytes, str, str]:
        """The response for one checked request: (zip, target label, outcome).

        Raises:
            Answer: no server, provisioning refused or failed, the server unreachable.
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
                    raise Answer(f"the compile server for {target} does not answer; try "
                                 "again shortly", "failed", label) from e
                candidates = await self._candidates(target, force=True)
                if not candidates:
                    # it stopped (e.g. a provisioned server retired while idle): as for a
                    # target nobody serves, provision one when the farm may
                    candidates = await self._provision(target)
        raise AssertionError("unreachable")

    async def _route(self, p: Prepared, target: Target,
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
            raise Answer(f"the kernel tree of {target.release} ({target.arch}) is missing "
                         f"from the farm; its operator can add it with `stap-server kernels "
                         f"add -a {machine} -r {target.release}`", "failed", label)
        keys = self._keys(p.digest, target, usable)
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

    def _keys(self, digest: bytes, target: Target,
              usable: list[Upstream]) -> dict[str, str]:
        return {u.name: wire.key_of(digest, _identity(u, target) + self._farm_id)
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
            Answer: the queue is full or the wait for a slot outlived its deadline.
        """
        s = self.settings
        if self._waiting >= s.max_queue:
            raise Answer(f"the farm is busy ({self._waiting} requests waiting for a compile "
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
                raise Answer(f"the farm is busy: no compile server for {target} was free "
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
                response = relay(upstream, data, target, self.settings, self.sign)
                if wire.response_rc(response) == 0:
                    try:
                        self.cache.put(key, response)
                    except OSError as e:
                        self.metrics.cache_errors.labels("write").inc()
                        log.warning("module cache write failed (answer sent uncached): %s", e)
                return response, True
        except OSError as e:  # the cache's lock files (relay raises no OSError)
            self.metrics.cache_errors.labels("lock").inc()
            log.warning("module cache lock failed (building uncached): %s", e)
            if response is None:
                response = relay(upstream, data, target, self.settings, self.sign)
            return response, True

    # ------------------------------------------------------------------ routing
    async def _candidates(self, target: Target, force: bool = False) -> list[Upstream]:
        # force: the table proved wrong (a server did not answer); the directory looks again
        found = [u for u in await self.current(force, fresh=force) if u.serves(target)]
        if not found and not force:  # a server may have just started: look again
            found = [u for u in await self.current(force=True, fresh=True)
                     if u.serves(target)]
        return found

    async def current(self, force: bool = False, fresh: bool = False) -> list[Upstream]:
        """The routing table: the directory's upstreams, asked again when force or stale
        (FRESH: and the directory must look at the engine, not answer from its table)."""
        if force or time.monotonic() - self._refreshed > 4 * REFRESH:
            used, self._used = frozenset(self._used), set()
            loop = asyncio.get_running_loop()
            try:
                self._upstreams = await loop.run_in_executor(
                    self._pool, lambda: self.directory.upstreams(used, fresh))
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
            Answer: provisioning is off, refused or failed (the line for the client).
        """
        if self.provisioner is None:
            raise Answer(f"no server for {target}; available: {self._served()}",
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
                raise Answer(f"no server for {target} ({str(e).splitlines()[0]}); "
                             f"available: {self._served()}", "unrouted", UNSERVED) from e
            self.metrics.provisioning.labels("ready").inc()
            log.info("provisioned a server for %s", target)
            found = await self._candidates(target, force=True)
            if not found:
                raise Answer(f"a server for {target} was started but is not running",
                             "unrouted", UNSERVED)
            return found


def _encode(request: wire.Request) -> tuple[bytes, bytes]:
    """The request's bytes to forward and its digest (one worker-thread job: both read all
    of its content)."""
    return wire.encode_request(request), wire.request_digest(request)


def _identity(u: Upstream, target: Target) -> str:
    return json.dumps({"server": u.identity, "tree": u.tree_ids.get(target.release, ""),
                       "target": [target.release, target.arch]}, sort_keys=True)
