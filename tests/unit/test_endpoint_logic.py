"""The farm endpoint's logic against fake servers: real TLS on loopback, no Docker.

A fake upstream is a small TLS server holding the same certificate as the endpoint (the farm's
identity) that answers every request with a module derived from the request bytes; it counts
what it built. The real client and real servers are in tests/e2e/test_endpoint.py.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import socket
import ssl
import struct
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from farm import wire
from farm.endpoint import Endpoint, Settings, Target, Upstream
from farm.errors import FarmError
from farm.modcache import ModuleCache
from tests.support.poll import poll
from tests.support.wire_client import client_context, exchange

REL = "6.12.9+tst13-amd64"


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("identity")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Systemtap Compile Server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(0xCC23FD50)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(d / "cert.pem"), str(d / "key.pem")


def request_zip(script: str = "hello", release: str = REL, arch: str = "x86_64",
                version: str = "5.1") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("version", version)
        z.writestr("sysinfo", f"sysinfo: {release} {arch}")
        z.writestr("locale", "LANG=C.UTF-8\n")
        z.writestr("argv1", "-p4")
        z.writestr("argv2", f"-e{script}")
    return buf.getvalue()


class FakeServer:
    """A TLS compile server stand-in: builds a 'module' from the request (rc from RC)."""

    def __init__(self, identity: tuple[str, str], rc: int = 0,
                 gate: threading.Event | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*identity)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.builds: list[bytes] = []
        self.rc = rc
        self.gate = gate
        self.lock = threading.Lock()
        self.concurrent = 0
        self.max_concurrent = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except (ConnectionError, ssl.SSLError, OSError):
            pass  # e.g. the endpoint hung up on a server with another certificate

    def _serve(self, conn: socket.socket) -> None:
        with self.ctx.wrap_socket(conn, server_side=True) as tls:
            n = struct.unpack(">i", _recv(tls, 4))[0]
            data = _recv(tls, n)
            with self.lock:
                self.concurrent += 1
                self.max_concurrent = max(self.max_concurrent, self.concurrent)
                self.builds.append(data)
            if self.gate is not None:
                self.gate.wait(10)
            with self.lock:
                self.concurrent -= 1
            tls.sendall(response_zip(data, self.rc))

    def close(self) -> None:
        self.sock.close()


def _recv(s: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("short read")
        out += chunk
    return out


def response_zip(request: bytes, rc: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("version", "5.6")
        z.writestr("rc", str(rc))
        z.writestr("stdout", "")
        z.writestr("stderr", "")
        z.writestr("stap000000/hello.ko", hashlib.sha256(request).digest())
    return buf.getvalue()


@dataclass
class FakeDirectory:
    servers: list[Upstream] = field(default_factory=list)
    calls: int = 0

    def upstreams(self) -> list[Upstream]:
        self.calls += 1
        return list(self.servers)

    def still_current(self, u: Upstream) -> bool:
        return any(s.port == u.port and s.identity == u.identity for s in self.servers)


def upstream(name: str, port: int, release: str = REL, arch: str = "x86_64", slots: int = 2,
             tree: str = "tree-1", identity: str = "image-1") -> Upstream:
    return Upstream(name=name, host="127.0.0.1", port=port, arch=arch, releases=(release,),
                    identity=identity, tree_ids={release: tree}, slots=slots)


@dataclass
class FakeProvisioner:
    directory: FakeDirectory
    make: Callable[[Target], Upstream]
    calls: list[Target] = field(default_factory=list)
    fail: str = ""
    crash: Exception | None = None
    gate: threading.Event | None = None  # a slow start: set by the test when it may finish

    def offers(self) -> list[Target]:
        return []

    def provision(self, target: Target, say: Callable[[str], None]) -> None:
        self.calls.append(target)
        if self.fail:
            raise FarmError(self.fail)
        if self.crash is not None:
            raise self.crash
        if self.gate is not None:
            self.gate.wait(10)
        self.directory.servers.append(self.make(target))


class Running:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.task: asyncio.Task[None] | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.task = self.loop.create_task(endpoint.serve(started))
            try:
                self.loop.run_until_complete(self.task)
            except asyncio.CancelledError:
                pass

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)
        assert endpoint.server is not None
        self.port = int(endpoint.server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        assert self.task is not None
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.loop.close()


@pytest.fixture
def make(identity: tuple[str, str], tmp_path: Path) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(directory: FakeDirectory, provisioner: Any = None, **kw: Any) -> Running:
        settings = Settings(listen="127.0.0.1", port=0, cert_file=identity[0],
                            key_file=identity[1], **kw)
        cache = ModuleCache(tmp_path / "cache", 64 << 20)
        r = Running(Endpoint(settings, directory, cache, provisioner))
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop()


def compile_(port: int, data: bytes) -> tuple[int | None, bytes]:
    resp = exchange(port, struct.pack(">i", len(data)) + data)
    return wire.response_rc(resp), resp


def stderr(resp: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(resp)) as z:
        return z.read("stderr").decode()


# --------------------------------------------------------------------------- tests


def test_routes_by_sysinfo_and_answers_a_repeat_from_the_cache(
        make: Callable[..., Running], identity: tuple[str, str]) -> None:
    x86, arm = FakeServer(identity), FakeServer(identity)
    d = FakeDirectory([upstream("x86", x86.port),
                       upstream("arm", arm.port, release="6.12.9+tst13-arm64", arch="arm64")])
    r = make(d)
    rc, first = compile_(r.port, request_zip())
    assert rc == 0 and len(x86.builds) == 1 and not arm.builds
    rc, again = compile_(r.port, request_zip())
    assert rc == 0 and again == first and len(x86.builds) == 1
    rc, _ = compile_(r.port, request_zip(release="6.12.9+tst13-arm64", arch="arm64"))
    assert rc == 0 and len(arm.builds) == 1
    assert r.endpoint.metrics.cache_hits._value.get() == 1


def test_a_changed_tree_or_image_misses(make: Callable[..., Running],
                                        identity: tuple[str, str]) -> None:
    s = FakeServer(identity)
    d = FakeDirectory([upstream("x86", s.port)])
    r = make(d)
    compile_(r.port, request_zip())
    d.servers = [upstream("x86", s.port, tree="tree-2")]
    r.endpoint._refreshed = 0  # what the refresh loop does every REFRESH seconds
    asyncio.run_coroutine_threadsafe(r.endpoint._current(force=True), r.loop).result(5)
    compile_(r.port, request_zip())
    assert len(s.builds) == 2
    d.servers = [upstream("x86", s.port, tree="tree-2", identity="image-2")]
    asyncio.run_coroutine_threadsafe(r.endpoint._current(force=True), r.loop).result(5)
    compile_(r.port, request_zip())
    assert len(s.builds) == 3


def test_concurrent_identical_requests_build_once(make: Callable[..., Running],
                                                  identity: tuple[str, str]) -> None:
    gate = threading.Event()
    s = FakeServer(identity, gate=gate)
    r = make(FakeDirectory([upstream("x86", s.port, slots=4)]))
    results: list[int | None] = []
    threads = [threading.Thread(target=lambda: results.append(compile_(r.port,
                                                                       request_zip())[0]))
               for _ in range(5)]
    for t in threads:
        t.start()
    poll("the first build reached the server", lambda: s.builds, 10, step=0.01)
    gate.set()
    for t in threads:
        t.join(20)
    assert results == [0] * 5
    assert len(s.builds) == 1


def test_failed_builds_are_not_cached(make: Callable[..., Running],
                                      identity: tuple[str, str]) -> None:
    s = FakeServer(identity, rc=1)
    r = make(FakeDirectory([upstream("x86", s.port)]))
    assert compile_(r.port, request_zip())[0] == 1
    assert compile_(r.port, request_zip())[0] == 1
    assert len(s.builds) == 2


def test_least_busy_replica_and_per_server_slots(make: Callable[..., Running],
                                                 identity: tuple[str, str]) -> None:
    gate = threading.Event()
    a, b = FakeServer(identity, gate=gate), FakeServer(identity, gate=gate)
    r = make(FakeDirectory([upstream("a", a.port, slots=1), upstream("b", b.port, slots=1)]))
    threads = [threading.Thread(target=compile_, args=(r.port, request_zip(f"s{i}")))
               for i in range(4)]
    for t in threads:
        t.start()
    poll("two builds started", lambda: len(a.builds) + len(b.builds) >= 2, 10, step=0.01)
    assert len(a.builds) == 1 and len(b.builds) == 1  # one each; the rest queue
    assert r.endpoint.metrics.queue._value.get() == 2
    gate.set()
    for t in threads:
        t.join(20)
    assert len(a.builds) + len(b.builds) == 4
    assert a.max_concurrent == 1 and b.max_concurrent == 1


def test_unknown_target_gets_an_answer_listing_what_is_served(
        make: Callable[..., Running], identity: tuple[str, str]) -> None:
    s = FakeServer(identity)
    r = make(FakeDirectory([upstream("x86", s.port)]))
    rc, resp = compile_(r.port, request_zip(release="6.1.0-9-arm64", arch="arm64"))
    assert rc == 1
    assert stderr(resp) == (f"Server: no server for 6.1.0-9-arm64 arm64; available: {REL} "
                            "x86_64\n")


def test_provisioning_starts_one_server_for_concurrent_requests(
        make: Callable[..., Running], identity: tuple[str, str]) -> None:
    s = FakeServer(identity)
    d = FakeDirectory([])
    gate = threading.Event()
    p = FakeProvisioner(d, lambda t: upstream("auto", s.port, release=t.release, arch=t.arch),
                        gate=gate)
    r = make(d, p)
    results: list[int | None] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        compile_(r.port, request_zip(f"p{i}"))[0])) for i in range(3)]
    for t in threads:
        t.start()
    # The server "starts" only once all three clients are connected and one provisions.
    poll("three clients waiting on one provisioning",
         lambda: p.calls and r.endpoint._open == 3, 10, step=0.01)
    gate.set()
    for t in threads:
        t.join(30)
    assert results == [0, 0, 0]
    assert p.calls == [Target(REL, "x86_64")]


def test_failed_provisioning_is_answered(make: Callable[..., Running],
                                         identity: tuple[str, str]) -> None:
    d = FakeDirectory([])
    p = FakeProvisioner(d, lambda t: upstream("x", 1), fail="no kernel release 'x' on the mirror")
    r = make(d, p)
    rc, resp = compile_(r.port, request_zip())
    assert rc == 1
    assert "provisioning failed: no kernel release 'x' on the mirror" in stderr(resp)


def test_a_stale_route_is_looked_up_again(make: Callable[..., Running],
                                          identity: tuple[str, str]) -> None:
    s = FakeServer(identity)
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = int(dead.getsockname()[1])
    dead.close()  # nothing listens there any more: a server that moved
    d = FakeDirectory([upstream("x86", dead_port)])
    r = make(d)
    d.servers = [upstream("x86", s.port)]  # what Docker says now
    rc, _ = compile_(r.port, request_zip())
    assert rc == 0 and len(s.builds) == 1


def test_a_server_with_another_certificate_is_refused(make: Callable[..., Running],
                                                      identity: tuple[str, str],
                                                      tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (other / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (other / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    s = FakeServer((str(other / "c.pem"), str(other / "k.pem")))
    r = make(FakeDirectory([upstream("x86", s.port)]))
    rc, resp = compile_(r.port, request_zip())
    assert rc == 1 and "another certificate" in stderr(resp)
    assert not s.builds  # nothing was sent to it


@pytest.mark.parametrize("payload,message", [
    (struct.pack(">i", 5) + b"hello", "not a zip archive"),
    (struct.pack(">i", -1), "invalid request length -1"),
    (struct.pack(">i", 1 << 20) + b"\0" * (1 << 20), "exceeds this farm's limit of 65536"),
])
def test_bad_requests_are_answered_not_dropped(make: Callable[..., Running],
                                               identity: tuple[str, str], payload: bytes,
                                               message: str) -> None:
    r = make(FakeDirectory([]), max_compressed=65536)
    resp = exchange(r.port, payload)
    assert wire.response_rc(resp) == 1
    assert message in stderr(resp)


def test_trust_probe_and_idle_connections_are_closed(make: Callable[..., Running]) -> None:
    r = make(FakeDirectory([]), idle_timeout=0.5)
    assert exchange(r.port, struct.pack(">i", 0)) == b""  # the trust probe: no reply
    t0 = time.monotonic()
    assert exchange(r.port, b"") == b""  # silent: closed at the idle deadline
    assert 0.4 < time.monotonic() - t0 < 5
    assert r.endpoint.metrics.timeouts.labels("idle")._value.get() == 1


def test_connections_over_the_cap_are_refused(make: Callable[..., Running]) -> None:
    r = make(FakeDirectory([]), max_connections=2, idle_timeout=5)
    held = []
    for _ in range(2):
        raw = socket.create_connection(("127.0.0.1", r.port))
        held.append(client_context().wrap_socket(raw))
    poll("two connections held", lambda: r.endpoint._open >= 2, 5, step=0.01)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
            socket.create_connection(("127.0.0.1", r.port), timeout=5) as raw, \
            client_context().wrap_socket(raw) as tls:
        tls.sendall(b"\0\0\0\x01")
        if tls.recv(1) == b"":
            raise ConnectionError("closed")
    assert r.endpoint.metrics.refused._value.get() == 1
    for h in held:
        h.close()


def test_a_crash_while_provisioning_is_answered_too(make: Callable[..., Running]) -> None:
    d = FakeDirectory([])
    p = FakeProvisioner(d, lambda t: upstream("x", 1),
                        crash=OSError(30, "Read-only file system"))
    r = make(d, p)
    rc, resp = compile_(r.port, request_zip())
    assert rc == 1
    assert "provisioning failed: [Errno 30] Read-only file system" in stderr(resp)


def test_a_restart_on_another_image_between_refreshes_is_not_served_from_the_cache(
        make: Callable[..., Running], identity: tuple[str, str]) -> None:
    s = FakeServer(identity)
    d = FakeDirectory([upstream("x86", s.port)])
    r = make(d)
    compile_(r.port, request_zip())
    d.servers = [upstream("x86", s.port, identity="image-2")]  # the table is not refreshed yet
    rc, _ = compile_(r.port, request_zip())
    assert rc == 0 and len(s.builds) == 2
