"""The farm endpoint's front door against fake servers: real TLS on loopback, no Docker.

A fake upstream is a small TLS server with its own certificate (which the endpoint pins, as
it pins each real server's) that answers every request with a module derived from the
request bytes; it counts what it built. The real client and real servers are in
tests/e2e/test_endpoint.py and tests/e2e/test_endpoint_attacks.py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from farm.endpoint import wire
from farm.endpoint.routing import Target
from tests.support.endpoint_fakes import (
    REL,
    FakeDirectory,
    FakeProvisioner,
    FakeServer,
    Running,
    compile_,
    der,
    make_identity,
    request_zip,
    stderr,
    upstream,
)
from tests.support.poll import poll
from tests.support.wire_client import client_context, exchange

# --------------------------------------------------------------------------- tests


def test_routes_by_sysinfo_and_answers_a_repeat_from_the_cache(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    x86, arm = FakeServer(server_identity), FakeServer(server_identity)
    d = FakeDirectory([upstream("x86", x86),
                       upstream("arm", arm, release="6.12.9+tst13-arm64", arch="arm64")])
    r = make(d)
    rc, first = compile_(r.port, request_zip())
    assert rc == 0 and len(x86.builds) == 1 and not arm.builds
    rc, again = compile_(r.port, request_zip())
    assert rc == 0 and again == first and len(x86.builds) == 1
    rc, _ = compile_(r.port, request_zip(release="6.12.9+tst13-arm64", arch="arm64"))
    assert rc == 0 and len(arm.builds) == 1
    assert r.endpoint.metrics.cache_hits._value.get() == 1


def test_a_changed_tree_or_image_misses(make: Callable[..., Running],
                                        server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity)
    d = FakeDirectory([upstream("x86", s)])
    r = make(d)
    compile_(r.port, request_zip())
    d.servers = [upstream("x86", s, tree="tree-2")]
    r.endpoint.router._refreshed = 0  # what the refresh loop does every REFRESH seconds
    asyncio.run_coroutine_threadsafe(r.endpoint.router.current(force=True), r.loop).result(5)
    compile_(r.port, request_zip())
    assert len(s.builds) == 2
    d.servers = [upstream("x86", s, tree="tree-2", identity="image-2")]
    asyncio.run_coroutine_threadsafe(r.endpoint.router.current(force=True), r.loop).result(5)
    compile_(r.port, request_zip())
    assert len(s.builds) == 3


def test_concurrent_identical_requests_build_once(make: Callable[..., Running],
                                                  server_identity: tuple[str, str]) -> None:
    gate = threading.Event()
    s = FakeServer(server_identity, gate=gate)
    r = make(FakeDirectory([upstream("x86", s, slots=4)]))
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
                                      server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity, rc=1)
    r = make(FakeDirectory([upstream("x86", s)]))
    assert compile_(r.port, request_zip())[0] == 1
    assert compile_(r.port, request_zip())[0] == 1
    assert len(s.builds) == 2


def test_least_busy_replica_and_per_server_slots(make: Callable[..., Running],
                                                 server_identity: tuple[str, str]) -> None:
    gate = threading.Event()
    a, b = FakeServer(server_identity, gate=gate), FakeServer(server_identity, gate=gate)
    r = make(FakeDirectory([upstream("a", a, slots=1), upstream("b", b, slots=1)]))
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
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity)
    r = make(FakeDirectory([upstream("x86", s)]))
    rc, resp = compile_(r.port, request_zip(release="6.1.0-9-arm64", arch="arm64"))
    assert rc == 1
    assert stderr(resp) == (f"Server: no server for 6.1.0-9-arm64 arm64; available: {REL} "
                            "x86_64\n")


def test_provisioning_starts_one_server_for_concurrent_requests(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity)
    d = FakeDirectory([])
    gate = threading.Event()
    p = FakeProvisioner(d, lambda t: upstream("auto", s, release=t.release, arch=t.arch),
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
                                         server_identity: tuple[str, str]) -> None:
    d = FakeDirectory([])
    p = FakeProvisioner(d, lambda t: upstream("x", 1), fail="no kernel release 'x' on the mirror")
    r = make(d, p)
    rc, resp = compile_(r.port, request_zip())
    assert rc == 1
    assert stderr(resp) == (f"Server: no server for {REL} x86_64 (no kernel release 'x' on "
                            "the mirror); available: none\n")


def test_a_stale_route_is_looked_up_again(make: Callable[..., Running],
                                          server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity)
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = int(dead.getsockname()[1])
    dead.close()  # nothing listens there any more: a server that moved
    d = FakeDirectory([upstream("x86", dead_port)])
    r = make(d)
    d.servers = [upstream("x86", s)]  # what Docker says now
    rc, _ = compile_(r.port, request_zip())
    assert rc == 0 and len(s.builds) == 1


def test_a_route_to_a_server_that_stopped_provisions_again(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    # a provisioned server retired while idle, between two refreshes of the routing table:
    # the next request for its target gets a new server, not "no server any more"
    s = FakeServer(server_identity)
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = int(dead.getsockname()[1])
    dead.close()
    d = FakeDirectory([upstream("retired", dead_port)])
    p = FakeProvisioner(d, lambda t: upstream("again", s))
    r = make(d, p)
    d.servers = []  # what Docker says now: it is gone
    rc, resp = compile_(r.port, request_zip())
    assert rc == 0, stderr(resp)
    assert p.calls == [Target(REL, "x86_64")] and len(s.builds) == 1


def test_a_server_with_another_certificate_is_refused(make: Callable[..., Running],
                                                      server_identity: tuple[str, str],
                                                      tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    impostor = make_identity(other, "impostor")
    s = FakeServer(impostor)
    u = upstream("x86", s)
    u.pin = der(server_identity[0])  # what the farm pinned for that server
    r = make(FakeDirectory([u]))
    rc, resp = compile_(r.port, request_zip())
    assert rc == 1 and "another certificate" in stderr(resp)
    assert not s.builds  # nothing was sent to it


@pytest.mark.parametrize("payload,message", [
    (struct.pack(">i", 5) + b"hello", "not a zip archive"),
    (struct.pack(">i", -1), "invalid request length -1"),
    (struct.pack(">i", 1 << 20) + b"\0" * (1 << 20), "exceeds this farm's limit of 65536"),
])
def test_bad_requests_are_answered_not_dropped(make: Callable[..., Running],
                                               server_identity: tuple[str, str], payload: bytes,
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
    assert r.endpoint.metrics.refused.labels("total")._value.get() == 1
    for h in held:
        h.close()


def test_a_crash_while_provisioning_is_answered_without_internals(
        make: Callable[..., Running]) -> None:
    d = FakeDirectory([])
    p = FakeProvisioner(d, lambda t: upstream("x", 1),
                        crash=OSError(30, "Read-only file system: '/var/lib/stapfarm/x'"))
    r = make(d, p)
    rc, resp = compile_(r.port, request_zip())
    assert rc == 1
    text = stderr(resp)
    assert "the farm endpoint failed on this request (incident " in text
    assert "/var/lib" not in text and "Errno" not in text


def test_a_restart_on_another_image_between_refreshes_is_not_served_from_the_cache(
        make: Callable[..., Running], server_identity: tuple[str, str]) -> None:
    s = FakeServer(server_identity)
    d = FakeDirectory([upstream("x86", s)])
    r = make(d)
    compile_(r.port, request_zip())
    d.servers = [upstream("x86", s, identity="image-2")]  # the table is not refreshed yet
    rc, _ = compile_(r.port, request_zip())
    assert rc == 0 and len(s.builds) == 2
