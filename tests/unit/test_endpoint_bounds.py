"""The front door as a trust boundary (issue 15), against fake servers on loopback: what it
forwards is what it checked, the farm's signatures, and every bound. The same attacks through
the real endpoint container and the real client: tests/e2e/test_endpoint_attacks.py."""

from __future__ import annotations

import asyncio
import hashlib
import io
import socket
import ssl
import struct
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from farm.endpoint import wire
from farm.endpoint.identity import Signer
from farm.endpoint.modcache import ModuleCache
from farm.endpoint.server import ByteBudget
from tests.support.endpoint_fakes import (
    REL,
    FakeDirectory,
    FakeServer,
    Running,
    compile_,
    request_zip,
    response_zip,
    stderr,
    upstream,
)
from tests.support.poll import poll
from tests.support.wire_client import client_context, exchange
from tests.support.zip_attacks import longer_stream


def entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}


def test_the_server_gets_a_re_encoding_of_what_was_checked(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity)
    r = make(FakeDirectory([upstream("x86", s)]))
    original = request_zip("reencoded")
    rc, _ = compile_(r.port, original)
    assert rc == 0
    [sent] = s.builds
    assert sent != original
    assert sent == wire.encode_request(wire.inspect_request(original, 1 << 20))
    with zipfile.ZipFile(io.BytesIO(sent)) as z:
        assert all(i.extra == b"" and i.comment == b"" for i in z.infolist())


def test_a_deflate_stream_longer_than_its_headers_is_refused(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity)
    r = make(FakeDirectory([upstream("x86", s)]))
    benign = {"version": b"5.1", "sysinfo": f"sysinfo: {REL} x86_64".encode(),
              "argv1": b"-p4", "argv2": b"-ebenign"}
    evil = longer_stream(benign, "argv2", b"; probe begin { evil() }")
    resp = exchange(r.port, struct.pack(">i", len(evil)) + evil)
    assert wire.response_rc(resp) == 1 and "argv2" in stderr(resp)
    assert not s.builds


def test_stapusr_modules_carry_the_farms_signature_not_the_servers(
        make: Callable[..., Running], server_identity: tuple[str, str],
        identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity, answer=lambda data: response_zip(
        data, 0, {"stap000000/hello.ko.sgn": b"the server's own signature"}))
    r = make(FakeDirectory([upstream("x86", s)]), sign=Signer.load(identity[1]).sign)
    rc, resp = compile_(r.port, request_zip("signed"))
    assert rc == 0
    files = entries(resp)
    ko, sgn = files["stap000000/hello.ko"], files["stap000000/hello.ko.sgn"]
    key = x509.load_pem_x509_certificate(Path(identity[0]).read_bytes()).public_key()
    key.verify(sgn, ko, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]
    with pytest.raises(InvalidSignature):
        key.verify(sgn, ko + b"x", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]


def test_guru_mode_is_refused_before_any_server_sees_it(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity)
    r = make(FakeDirectory([upstream("x86", s)]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("version", "5.1")
        z.writestr("sysinfo", f"sysinfo: {REL} x86_64")
        z.writestr("argv1", "-g")
        z.writestr("argv2", "-p4")
    rc, resp = compile_(r.port, buf.getvalue())
    assert rc == 1 and "guru mode (-g) is refused" in stderr(resp)
    assert not s.builds


def test_a_client_that_never_reads_is_cut_at_the_write_deadline(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    noise = hashlib.shake_256(b"big").digest(24 << 20)  # more than every socket buffer
    s = FakeServer(server_identity, answer=lambda data: response_zip(
        data, 0, {"stap000000/big.o": noise}))
    r = make(FakeDirectory([upstream("x86", s)]), write_timeout=1.0)
    data = request_zip("never read")
    with socket.create_connection(("127.0.0.1", r.port)) as raw, \
            client_context().wrap_socket(raw) as tls:
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tls.sendall(struct.pack(">i", len(data)) + data)
        poll("the write deadline cut it off",
             lambda: r.endpoint.metrics.timeouts.labels("write")._value.get() == 1, 30)
    poll("its connection is gone", lambda: r.endpoint._open == 0, 10, step=0.05)
    assert compile_(r.port, request_zip("after"))[0] == 0  # the next client is served


def test_connections_per_source_address_are_capped(make: Callable[..., Running]) -> None:
    r = make(FakeDirectory([]), max_per_source=2, idle_timeout=5)
    held = [client_context().wrap_socket(socket.create_connection(("127.0.0.1", r.port)))
            for _ in range(2)]
    poll("two connections held", lambda: r.endpoint._open >= 2, 5, step=0.01)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
            socket.create_connection(("127.0.0.1", r.port), timeout=5) as raw, \
            client_context().wrap_socket(raw) as tls:
        tls.sendall(b"\0\0\0\x01")
        if tls.recv(1) == b"":
            raise ConnectionError("closed")
    assert r.endpoint.metrics.refused.labels("source")._value.get() == 1
    for h in held:
        h.close()


def test_the_queue_is_bounded_and_answers_when_full(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    gate = threading.Event()
    s = FakeServer(server_identity, gate=gate)
    r = make(FakeDirectory([upstream("x86", s, slots=1)]), max_queue=1)
    results: dict[str, bytes] = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(
        n, compile_(r.port, request_zip(n))[1])) for n in ("a", "b")]
    threads[0].start()
    poll("a is building", lambda: s.builds, 10, step=0.01)
    threads[1].start()
    poll("b is waiting", lambda: r.endpoint.router._waiting == 1, 10, step=0.01)
    rc, resp = compile_(r.port, request_zip("c"))
    assert rc == 1 and "the farm is busy (1 requests waiting" in stderr(resp)
    gate.set()
    for t in threads:
        t.join(20)
    assert all(wire.response_rc(v) == 0 for v in results.values()) and len(results) == 2


def test_a_wait_for_a_slot_has_a_deadline(make: Callable[..., Running],
                                          server_identity: tuple[str, str]) -> None:
    gate = threading.Event()
    s = FakeServer(server_identity, gate=gate)
    r = make(FakeDirectory([upstream("x86", s, slots=1)]), queue_timeout=0.5)
    t = threading.Thread(target=compile_, args=(r.port, request_zip("first")))
    t.start()
    poll("the first is building", lambda: s.builds, 10, step=0.01)
    rc, resp = compile_(r.port, request_zip("second"))
    assert rc == 1 and "no compile server for" in stderr(resp) and "within 0 s" in stderr(resp)
    gate.set()
    t.join(20)


def test_request_memory_is_bounded_and_everyone_is_answered(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    gate = threading.Event()
    s = FakeServer(server_identity, gate=gate)
    budget = 3 << 20
    r = make(FakeDirectory([upstream("x86", s, slots=8)]), max_compressed=1 << 20,
             max_uncompressed=2 << 20, memory=budget)
    seen: list[int] = []
    real_set = r.endpoint.metrics.held_bytes.set

    def record(v: float) -> None:
        seen.append(int(v))
        real_set(v)

    r.endpoint._budget._on_change = record

    def big(i: int) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr("version", "5.1")
            z.writestr("sysinfo", f"sysinfo: {REL} x86_64")
            z.writestr("argv1", "-p4")
            z.writestr("argv2", f"-e{i}")
            z.writestr("tapset/x/noise.stp", hashlib.shake_256(bytes([i])).digest(900_000))
        return buf.getvalue()

    results: list[int | None] = []
    threads = [threading.Thread(target=lambda i=i: results.append(compile_(r.port, big(i))[0]))
               for i in range(8)]
    for t in threads:
        t.start()
    poll("some requests are held", lambda: r.endpoint._budget.used > 0, 10, step=0.01)
    # the others pile up against the budget: some request waits for bytes to be freed
    poll("a request waits on the byte budget", lambda: bool(r.endpoint._budget._waiters), 10,
         step=0.01)
    gate.set()
    for t in threads:
        t.join(60)
    assert results == [0] * 8
    assert max(seen) <= budget
    assert r.endpoint._budget.used == 0


def test_the_byte_budget_is_first_come_first_served_and_times_out() -> None:
    async def scenario() -> list[str]:
        b = ByteBudget(10, lambda v: None)
        order: list[str] = []
        assert await b.acquire(8, 1)

        async def want(name: str, n: int, timeout: float) -> None:
            order.append(f"{name}:{await b.acquire(n, timeout)}")

        t1 = asyncio.create_task(want("a", 5, 5))
        t2 = asyncio.create_task(want("b", 1, 5))  # fits now, but waits behind a
        t3 = asyncio.create_task(want("c", 5, 0.1))
        await asyncio.sleep(0.3)
        b.release(8)
        await asyncio.gather(t1, t2, t3)
        assert b.used == 6
        assert not await b.acquire(11, 1)  # more than the whole budget: never
        return order

    assert asyncio.run(scenario()) == ["c:False", "a:True", "b:True"]


class FailingCache(ModuleCache):
    """A cache whose disk fails: every read and write raises."""

    def get(self, key: str) -> bytes | None:
        raise OSError(28, "No space left on device")

    def put(self, key: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")


def test_a_failing_cache_is_a_miss_not_an_error(make: Callable[..., Running],
                                                server_identity: tuple[str, str],
                                                tmp_path: Path) -> None:
    s = FakeServer(server_identity)
    r = make(FakeDirectory([upstream("x86", s)]), cache=FailingCache(tmp_path / "c", 1 << 20))
    assert compile_(r.port, request_zip("x"))[0] == 0
    assert compile_(r.port, request_zip("x"))[0] == 0
    assert len(s.builds) == 2
    m = r.endpoint.metrics.cache_errors
    assert m.labels("read")._value.get() >= 2 and m.labels("write")._value.get() == 2


def test_made_up_targets_share_one_metrics_label(make: Callable[..., Running],
                                                 server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity)
    r = make(FakeDirectory([upstream("x86", s)]))
    for i in range(20):
        rc, _ = compile_(r.port, request_zip(release=f"6.0.{i}-made-up", arch="arm64"))
        assert rc == 1
    rc, resp = compile_(r.port, request_zip(release="x" * 129))
    assert rc == 1 and "longer than this farm accepts" in stderr(resp)
    labels = {tuple(sample.labels.values()) for metric in
              r.endpoint.metrics.requests.collect() for sample in metric.samples}
    assert ("unserved", "unrouted") in labels
    assert not any("made-up" in v for lab in labels for v in lab)


def test_internal_errors_reach_the_log_not_the_client(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity, answer=lambda data: b"PK\x03\x04 garbage from the server")
    r = make(FakeDirectory([upstream("x86", s)]))
    rc, resp = compile_(r.port, request_zip("bad answer"))
    text = stderr(resp)
    assert rc == 1 and "sent a malformed answer" in text
    assert "127.0.0.1" not in text and str(s.port) not in text


