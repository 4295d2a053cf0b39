"""Fakes for the endpoint's front door tests: real TLS on loopback, no Docker.

    FakeServer(identity)        a compile server stand-in with its own certificate
    FakeDirectory, FakeProvisioner, upstream(...)   the routing side
    Running(endpoint)           an Endpoint served on a thread's event loop
    request_zip(...), compile_(port, data), stderr(response)
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
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from farm.core.errors import FarmError
from farm.endpoint import wire
from farm.endpoint.routing import Target, Upstream
from farm.endpoint.server import Endpoint
from tests.support.wire_client import exchange

REL = "6.12.9+tst13-amd64"


def make_identity(d: Path, cn: str = "Systemtap Compile Server") -> tuple[str, str]:
    """A self-signed certificate and its key as PEM files in D: (cert, key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
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


def der(cert_file: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(cert_file).read_text())


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
                 gate: threading.Event | None = None,
                 answer: Callable[[bytes], bytes] | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*identity)
        self.pin = der(identity[0])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.builds: list[bytes] = []
        self.rc = rc
        self.gate = gate
        self.answer = answer or (lambda data: response_zip(data, self.rc))
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
            tls.sendall(self.answer(data))

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


def response_zip(request: bytes, rc: int, extra: dict[str, bytes] | None = None) -> bytes:
    """A server's answer: the 'module' is a digest of the request (plus EXTRA files)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("version", "5.6")
        z.writestr("rc", str(rc))
        z.writestr("stdout", "")
        z.writestr("stderr", "")
        z.writestr("stap000000/hello.ko", hashlib.sha256(request).digest())
        for name, content in (extra or {}).items():
            z.writestr(name, content)
    return buf.getvalue()


@dataclass
class FakeDirectory:
    servers: list[Upstream] = field(default_factory=list)
    calls: int = 0

    def upstreams(self, used: frozenset[str] = frozenset(), fresh: bool = False
                  ) -> list[Upstream]:
        self.calls += 1
        return list(self.servers)

    def still_current(self, u: Upstream) -> bool:
        return any(s.port == u.port and s.identity == u.identity for s in self.servers)


def upstream(name: str, server: FakeServer | int, release: str = REL, arch: str = "x86_64",
             slots: int = 2, tree: str = "tree-1", identity: str = "image-1") -> Upstream:
    """An upstream entry for SERVER (pinned to its certificate), or for a bare PORT."""
    port, pin = (server, b"") if isinstance(server, int) else (server.port, server.pin)
    return Upstream(name=name, host="127.0.0.1", port=port, arch=arch, releases=(release,),
                    identity=identity, tree_ids={release: tree}, slots=slots, pin=pin)


@dataclass
class FakeProvisioner:
    directory: FakeDirectory
    make: Callable[[Target], Upstream]
    calls: list[Target] = field(default_factory=list)
    fail: str = ""
    crash: Exception | None = None
    gate: threading.Event | None = None  # a slow start: set by the test when it may finish

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


def compile_(port: int, data: bytes) -> tuple[int | None, bytes]:
    resp = exchange(port, struct.pack(">i", len(data)) + data)
    return wire.response_rc(resp), resp


def stderr(resp: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(resp)) as z:
        return z.read("stderr").decode()
