"""farm/modcache.py: the endpoint's shared module cache (threads, processes, eviction, integrity)."""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from farm.endpoint.modcache import ModuleCache

HEADER = 75  # bytes of header in front of every stored entry


def key(n: int | str) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def obj(root: Path, k: str) -> Path:
    return root / "objects" / k[:2] / k


def set_mtime(root: Path, k: str, t: float) -> None:
    os.utime(obj(root, k), (t, t))


def test_layout_and_modes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    ModuleCache(root, 1000)
    for d in ("", "objects", "locks", "tmp"):
        assert (root / d).stat().st_mode & 0o777 == 0o700


def test_round_trip_and_counters(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1 << 20)
    k = key(1)
    assert c.get(k) is None
    data = os.urandom(50_000)
    c.put(k, data)
    assert c.get(k) == data
    assert c.get(k) == data
    s = c.stats()
    assert (s.hits, s.misses, s.stores, s.evictions) == (2, 1, 1, 0)
    assert (s.entries, s.bytes) == (1, len(data) + HEADER)
    assert obj(tmp_path, k).stat().st_size == len(data) + HEADER
    assert list((tmp_path / "tmp").iterdir()) == []


def test_put_overwrites(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1 << 20)
    c.put(key(1), b"one")
    c.put(key(1), b"two!")
    assert c.get(key(1)) == b"two!"
    assert c.stats().entries == 1


def test_empty_content(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1000)
    c.put(key(1), b"")
    assert c.get(key(1)) == b""


@pytest.mark.parametrize("touch_a", [False, True])
def test_lru_eviction(tmp_path: Path, touch_a: bool) -> None:
    size = 100
    c = ModuleCache(tmp_path, 3 * (size + HEADER))
    a, b, cc, d = key("a"), key("b"), key("c"), key("d")
    for i, k in enumerate((a, b, cc)):
        c.put(k, bytes([i]) * size)
        set_mtime(tmp_path, k, 1_000_000 + i)  # a oldest, then b, then c
    if touch_a:
        assert c.get(a) is not None  # now the most recently used
    c.put(d, b"d" * size)
    evicted = b if touch_a else a
    for k in (a, b, cc, d):
        assert obj(tmp_path, k).exists() == (k != evicted)
    s = c.stats()
    assert (s.evictions, s.entries, s.bytes) == (1, 3, 3 * (size + HEADER))


def test_get_marks_used(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1000)
    c.put(key(1), b"x")
    set_mtime(tmp_path, key(1), 1_000_000)
    before = time.time()
    c.get(key(1))
    assert obj(tmp_path, key(1)).stat().st_mtime >= before - 1


def test_cap_respected(tmp_path: Path) -> None:
    cap = 10_000
    c = ModuleCache(tmp_path, cap)
    for i in range(40):
        c.put(key(i), os.urandom(300 + 37 * i % 1000))
        set_mtime(tmp_path, key(i), 1_000_000 + i)
        assert c.stats().bytes <= cap
    s = c.stats()
    assert s.evictions > 0 and s.stores == 40
    assert c.get(key(39)) is not None  # the newest always survives
    assert c.get(key(0)) is None


def test_just_stored_entry_kept_even_if_clock_says_older(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 2 * (100 + HEADER))
    c.put(key(1), b"1" * 100)
    c.put(key(2), b"2" * 100)
    future = time.time() + 10_000
    set_mtime(tmp_path, key(1), future)
    set_mtime(tmp_path, key(2), future)
    c.put(key(3), b"3" * 100)  # its mtime is older than both, yet it was just stored
    assert c.get(key(3)) == b"3" * 100
    assert c.stats().entries == 2


def test_oversized_not_stored(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1000)
    c.put(key(1), b"small")
    c.put(key(2), b"x" * (1000 - HEADER + 1))
    assert c.get(key(2)) is None
    assert c.get(key(1)) == b"small"  # nothing was evicted for it
    s = c.stats()
    assert (s.stores, s.evictions, s.entries) == (1, 0, 1)
    c.put(key(3), b"y" * (1000 - HEADER))  # exactly the cap: stored, everything else goes
    assert c.get(key(3)) is not None
    assert c.get(key(1)) is None


@pytest.mark.parametrize("bad", [
    "../x", "a" * 63, "A" * 64, "a" * 65, "../" + "a" * 61, "a" * 64 + "\n", "g" * 64,
    "/" + "a" * 63, "", 12,
])
def test_bad_keys(tmp_path: Path, bad: Any) -> None:
    c = ModuleCache(tmp_path, 1000)
    with pytest.raises(ValueError):
        c.get(bad)
    with pytest.raises(ValueError):
        c.put(bad, b"x")
    with pytest.raises(ValueError), c.building(bad):
        pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["locks", "objects", "tmp"]


def test_negative_cap(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ModuleCache(tmp_path, -1)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
def test_corrupt_entry_is_a_miss_and_removed(tmp_path: Path, damage: str) -> None:
    c = ModuleCache(tmp_path, 1 << 20)
    k = key(1)
    c.put(k, b"payload" * 100)
    p = obj(tmp_path, k)
    raw = bytearray(p.read_bytes())
    if damage == "flip":
        raw[-1] ^= 1
    elif damage == "truncate":
        del raw[-10:]
    elif damage == "header":
        raw[:9] = b"XXXXXXXXX"
    else:
        raw = bytearray()
    p.write_bytes(bytes(raw))
    assert c.get(k) is None
    assert not p.exists()
    assert c.stats().misses == 1
    with c.building(k) as hit:
        assert hit is None


def test_vanished_between_listing_and_reading(tmp_path: Path, monkeypatch: Any) -> None:
    c = ModuleCache(tmp_path, 1000)
    c.put(key(1), b"x")
    os.unlink(obj(tmp_path, key(1)))  # another process evicted it
    assert c.get(key(1)) is None
    c.put(key(2), b"y")

    def gone(*_a: Any, **_k: Any) -> None:
        raise FileNotFoundError

    monkeypatch.setattr(os, "utime", gone)  # evicted after our read, before the touch
    assert c.get(key(2)) == b"y"


def test_failed_put_leaves_nothing(tmp_path: Path, monkeypatch: Any) -> None:
    c = ModuleCache(tmp_path, 1000)

    def boom(*_a: Any, **_k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        c.put(key(1), b"x")
    monkeypatch.undo()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert c.get(key(1)) is None


def test_tmp_files_never_read(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1000)
    (tmp_path / "tmp" / (key(1) + ".half.tmp")).write_bytes(b"partial")
    assert c.get(key(1)) is None
    assert c.stats().entries == 0


def test_two_instances_share(tmp_path: Path) -> None:
    a = ModuleCache(tmp_path, 1 << 20)
    b = ModuleCache(tmp_path, 1 << 20)
    a.put(key(1), b"from a")
    assert b.get(key(1)) == b"from a"
    b.put(key(2), b"from b")
    assert a.get(key(2)) == b"from b"
    assert a.stats().entries == b.stats().entries == 2
    b.clear()
    assert a.get(key(1)) is None and a.stats().entries == 0


def test_clear(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1 << 20)
    for i in range(5):
        c.put(key(i), b"x" * i)
    c.clear()
    s = c.stats()
    assert (s.entries, s.bytes, s.stores) == (0, 0, 5)
    c.put(key(1), b"again")
    assert c.get(key(1)) == b"again"


def test_crash_leftovers_cleaned(tmp_path: Path) -> None:
    ModuleCache(tmp_path, 1000)
    old = time.time() - 7200
    stale_tmp = tmp_path / "tmp" / "dead.tmp"
    fresh_tmp = tmp_path / "tmp" / "writing.tmp"
    stale_lock = tmp_path / "locks" / (key(1) + ".lock")
    held_lock = tmp_path / "locks" / (key(2) + ".lock")
    for p in (stale_tmp, fresh_tmp, stale_lock, held_lock):
        p.write_bytes(b"")
    for p in (stale_tmp, stale_lock, held_lock):
        os.utime(p, (old, old))
    with open(held_lock, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a live builder still holds this one
        ModuleCache(tmp_path, 1000)
    assert not stale_tmp.exists()
    assert fresh_tmp.exists()
    assert not stale_lock.exists()
    assert held_lock.exists()


def test_building_holds_flock_and_removes_lock_file(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1000)
    k = key(1)
    lock = tmp_path / "locks" / (k + ".lock")
    with c.building(k) as hit:
        assert hit is None
        with open(lock, "rb") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        c.put(k, b"built")
    assert not lock.exists()
    with c.building(k) as hit:
        assert hit == b"built"
    assert c._key_locks == {}


def test_building_releases_on_error(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1000)
    with pytest.raises(RuntimeError), c.building(key(1)):
        raise RuntimeError("build failed")
    with c.building(key(1)) as hit:  # would hang if the lock had leaked
        assert hit is None


def test_concurrent_builds_across_threads(tmp_path: Path) -> None:
    c = ModuleCache(tmp_path, 1 << 20)
    k = key("mod")
    n = 8
    start = threading.Barrier(n)
    guard = threading.Lock()
    builds = 0
    inside = 0
    most_inside = 0
    results: list[bytes] = []

    def worker() -> None:
        nonlocal builds, inside, most_inside
        start.wait()
        with c.building(k) as hit:
            with guard:
                inside += 1
                most_inside = max(most_inside, inside)
            if hit is None:
                with guard:
                    builds += 1
                hit = b"module" * 1000
                c.put(k, hit)
            with guard:
                inside -= 1
                results.append(hit)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert builds == 1
    assert most_inside == 1
    assert results == [b"module" * 1000] * n
    s = c.stats()
    assert (s.hits, s.misses, s.stores) == (n - 1, 1, 1)
    assert c._key_locks == {}
    assert list((tmp_path / "locks").glob("*.lock")) == []


def _process_worker(root: str, k: str, log: str, start: Any) -> None:
    c = ModuleCache(root, 1 << 20)
    start.wait()
    with c.building(k) as hit:
        if hit is None:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
            c.put(k, b"built by " + str(os.getpid()).encode())
        else:
            assert hit.startswith(b"built by ")


def test_concurrent_builds_across_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    n = 4
    start = ctx.Barrier(n)
    log = tmp_path / "builds.log"
    k = key("mod")
    procs = [ctx.Process(target=_process_worker, args=(str(tmp_path / "c"), k, str(log), start))
             for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    builders = log.read_text().split()
    assert len(builders) == 1
    c = ModuleCache(tmp_path / "c", 1 << 20)
    assert c.get(k) == b"built by " + builders[0].encode()
