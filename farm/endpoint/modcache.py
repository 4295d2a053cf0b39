"""The farm endpoint's module cache: complete response zips under content-addressed keys.

Several endpoint processes (replicas in different containers on one host) share one cache
directory on a Docker volume, each serving many threads, so every cross-process rule goes
through the filesystem: `fcntl.flock` on lock files and atomic `os.replace`; threading locks
only keep one process's threads from piling onto the same flock.

    cache = ModuleCache("/var/cache/stapfarm/modules", max_bytes=4 << 30)
    data = cache.get(key)                   # fast path, no lock
    if data is None:
        with cache.building(key) as data:   # one builder per key, host-wide
            if data is None:
                data = build_module()
                cache.put(key, data)

Layout under the root (directories mode 0700: every replica must run as the same uid):

- `objects/<key[:2]>/<key>`: one entry. A 75-byte header line `MODCACHE1 <sha256 of the
  content>\\n`, then the content. Readers only ever open renamed, complete files; a header
  or digest mismatch is a miss and the entry is deleted. Sizes (the cap, `stats().bytes`)
  count the whole stored file, header included. An entry's mtime is its last use: `get`
  touches it, eviction removes the oldest first.
- `tmp/`: files being written, renamed into `objects/` when complete. A crashed writer's
  leftovers older than an hour are removed when a `ModuleCache` is created.
- `locks/<key>.lock`: the per-key build lock. Its holder unlinks it on release; an acquirer
  checks after `flock` that the file it locked is still the one at the path and retries if
  not, so removal never lets two holders in. A crashed holder's file stays (the kernel drops
  the lock itself) and is removed when unheld and older than an hour, at the next creation of
  a `ModuleCache`. `locks/.evict` (never removed) serialises eviction and `clear()` host-wide.

flock needs all replicas on one kernel: fine for a local Docker volume, not for NFS.
`key` is always checked to be 64 lowercase hex digits (`ValueError` otherwise), so it can
never name a path outside the root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

_KEY = re.compile(r"[0-9a-f]{64}")
_MAGIC = b"MODCACHE1 "
_HEADER_LEN = len(_MAGIC) + 64 + 1
_STALE_SECONDS = 3600.0  # leftover tmp and lock files older than this are removed on init
_EVICT_LOCK = ".evict"
_LOCK_SUFFIX = ".lock"


@dataclass
class CacheStats:
    """Counters of this process (hits..evictions) and the on-disk truth (entries, bytes)."""

    hits: int
    misses: int
    stores: int
    evictions: int
    entries: int
    bytes: int


@dataclass
class _Entry:
    key: str
    path: str
    size: int
    mtime_ns: int


class _KeyLock:
    """One key's in-process lock and how many threads hold or wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


def _check_key(key: str) -> None:
    """Accept only a well-formed key, so that it can never name a path outside the root.

    Raises:
        ValueError: KEY is not 64 lowercase hex digits.
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"bad module cache key {key!r}: want 64 lowercase hex digits")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _open_locked(path: str, blocking: bool = True) -> int | None:
    """Open PATH (created if absent) and flock it exclusively; the descriptor, which holds it.

    Retries when the file locked is no longer the one at PATH (its holder removed it).
    Returns None only when BLOCKING is false and another holder has it.

    Raises:
        OSError: the lock file cannot be created or locked.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if blocking or e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                os.close(fd)
                return None
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and _same_file(current, os.fstat(fd)):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


class ModuleCache:
    """A size-capped LRU cache of response zips shared by processes through a directory."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        """Create (if needed) ROOT's layout and clean up after crashed processes.

        Raises:
            ValueError: MAX_BYTES is negative.
            OSError: the directories cannot be created.
        """
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.root = os.fspath(root)
        self.max_bytes = max_bytes
        self._objects = os.path.join(self.root, "objects")
        self._locks = os.path.join(self.root, "locks")
        self._tmp = os.path.join(self.root, "tmp")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for d in (self._objects, self._locks, self._tmp):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._mutex = threading.Lock()  # guards the counters and _key_locks
        self._evict_mutex = threading.Lock()
        self._key_locks: dict[str, _KeyLock] = {}
        self._hits = self._misses = self._stores = self._evictions = 0
        self._clean_stale()

    # -- public API ------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """KEY's content, marked as just used; None on a miss (absent, evicted, corrupt).

        Raises:
            ValueError: KEY is malformed.
            OSError: the entry exists but cannot be read.
        """
        _check_key(key)
        return self._lookup(key)

    def put(self, key: str, data: bytes) -> None:
        """Store DATA under KEY atomically, then evict least recently used entries to the cap.

        An entry whose stored size (header included) exceeds max_bytes is not stored.

        Raises:
            ValueError: KEY is malformed.
            OSError: the entry cannot be written.
        """
        _check_key(key)
        header = _MAGIC + hashlib.sha256(data).hexdigest().encode("ascii") + b"\n"
        if len(header) + len(data) > self.max_bytes:
            return
        final = self._object_path(key)
        fd, tmp = tempfile.mkstemp(prefix=f"{key}.", suffix=".tmp", dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(data)
            os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with self._mutex:
            self._stores += 1
        self._evict(keep=key)

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[bytes | None]:
        """Hold KEY's build lock (this process's threads and every other process) for the block.

        Yields KEY's content if cached once the lock is held (a concurrent builder may just
        have stored it), else None: the caller builds and calls put() inside the block. The
        lookup counts as a hit or miss like get(). Not reentrant for the same key.

        Raises:
            ValueError: KEY is malformed.
            OSError: the lock file cannot be created or locked.
        """
        _check_key(key)
        with self._mutex:
            kl = self._key_locks.get(key)
            if kl is None:
                kl = self._key_locks[key] = _KeyLock()
            kl.users += 1
        try:
            with kl.lock:
                path = os.path.join(self._locks, key + _LOCK_SUFFIX)
                fd = _open_locked(path)
                assert fd is not None  # blocking
                try:
                    yield self._lookup(key)
                finally:
                    # Unlink while holding: waiters on this file notice and retry on a new one.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    os.close(fd)
        finally:
            with self._mutex:
                kl.users -= 1
                if kl.users == 0:
                    del self._key_locks[key]

    def stats(self) -> CacheStats:
        """This process's counters and a fresh scan of the entries on disk."""
        entries = self._scan()
        with self._mutex:
            return CacheStats(hits=self._hits, misses=self._misses, stores=self._stores,
                              evictions=self._evictions, entries=len(entries),
                              bytes=sum(e.size for e in entries))

    def clear(self) -> None:
        """Remove every entry (for all processes); counters are kept.

        Raises:
            OSError: the eviction lock cannot be taken.
        """
        with self._evict_lock():
            for e in self._scan():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)

    # -- internals -------------------------------------------------------------------------

    def _object_path(self, key: str) -> str:
        return os.path.join(self._objects, key[:2], key)

    def _count(self, hit: bool) -> None:
        with self._mutex:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    def _lookup(self, key: str) -> bytes | None:
        data = self._read(key)
        self._count(data is not None)
        return data

    def _read(self, key: str) -> bytes | None:
        """KEY's verified content, touched; None if absent or corrupt (then removed).

        Raises:
            OSError: the entry exists but cannot be read.
        """
        path = self._object_path(key)
        try:
            with open(path, "rb") as f:
                header = f.read(_HEADER_LEN)
                body = f.read()
                st = os.fstat(f.fileno())
        except FileNotFoundError:  # never stored, or evicted by anyone at any moment
            return None
        digest = header[len(_MAGIC):-1]
        if (len(header) != _HEADER_LEN or not header.startswith(_MAGIC)
                or not header.endswith(b"\n")
                or hashlib.sha256(body).hexdigest().encode("ascii") != digest):
            self._discard(path, st)
            return None
        with contextlib.suppress(OSError):  # evicted meanwhile: the data read is still good
            os.utime(path)
        return body

    @staticmethod
    def _discard(path: str, st: os.stat_result) -> None:
        """Remove the corrupt entry at PATH, unless a put() has replaced it since it was read.

        (A replacement landing between the check and the unlink loses that good entry: a
        later miss, never bad data.)
        """
        with contextlib.suppress(FileNotFoundError):
            if _same_file(os.stat(path), st):
                os.unlink(path)

    def _scan(self) -> list[_Entry]:
        """Every entry on disk now (files vanishing during the scan are skipped)."""
        found: list[_Entry] = []
        try:
            shards = list(os.scandir(self._objects))
        except FileNotFoundError:
            return found
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for f in files:
                if not _KEY.fullmatch(f.name) or f.name[:2] != shard.name:
                    continue
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append(_Entry(f.name, f.path, st.st_size, st.st_mtime_ns))
        return found

    @contextlib.contextmanager
    def _evict_lock(self) -> Iterator[None]:
        """The host-wide eviction lock (locks/.evict, never removed).

        Raises:
            OSError: it cannot be taken.
        """
        with self._evict_mutex:
            fd = _open_locked(os.path.join(self._locks, _EVICT_LOCK))
            assert fd is not None  # blocking
            try:
                yield
            finally:
                os.close(fd)

    def _evict(self, keep: str) -> None:
        """Remove the least recently used entries until the total is within max_bytes.

        KEEP (just stored) goes last; it fits alone, so it is never removed.

        Raises:
            OSError: the eviction lock cannot be taken or an entry cannot be removed.
        """
        with self._evict_lock():
            entries = self._scan()
            total = sum(e.size for e in entries)
            if total <= self.max_bytes:
                return
            entries.sort(key=lambda e: (e.key == keep, e.mtime_ns))
            for e in entries:
                if total <= self.max_bytes:
                    break
                try:
                    os.unlink(e.path)
                except FileNotFoundError:  # someone else removed it: it no longer counts
                    total -= e.size
                    continue
                total -= e.size
                with self._mutex:
                    self._evictions += 1

    def _clean_stale(self) -> None:
        """Remove crashed processes' tmp files and unheld lock files older than an hour."""
        cutoff = time.time() - _STALE_SECONDS
        for e in os.scandir(self._tmp):
            with contextlib.suppress(FileNotFoundError):
                if e.is_file(follow_symlinks=False) and e.stat().st_mtime < cutoff:
                    os.unlink(e.path)
        for e in os.scandir(self._locks):
            if not e.name.endswith(_LOCK_SUFFIX) or not _KEY.fullmatch(e.name[:-len(_LOCK_SUFFIX)]):
                continue
            with contextlib.suppress(FileNotFoundError):
                if e.stat().st_mtime >= cutoff:
                    continue
                fd = _open_locked(e.path, blocking=False)
                if fd is not None:  # unheld, and we now hold it: safe to remove
                    try:
                        os.unlink(e.path)
                    finally:
                        os.close(fd)
