"""The endpoint's broker (farm/endpoint/broker.py) against a fake engine: what it provisions,
what it refuses before any container work, what it remembers, what it retires; and its Unix
socket protocol with the front door's client (farm/endpoint/broker_client.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from farm.core.arch import Arch
from farm.core.errors import FarmError, KernelTreeError
from farm.endpoint.broker import FAILURE_MEMORY, Broker
from farm.endpoint.broker_client import BrokerDirectory, call
from farm.endpoint.routing import Target, Upstream
from tests.support.poll import poll

REL = "6.12.9+tst13-amd64"


@dataclass
class FakeEngine:
    releases: dict[str, list[str]] = field(default_factory=lambda: {"x86_64": [REL]})
    running: list[Upstream] = field(default_factory=list)
    started: dict[str, float] = field(default_factory=dict)  # provisioned name -> start
    calls: list[str] = field(default_factory=list)
    fail: str = ""
    clock: Callable[[], float] = lambda: 0.0

    def servers(self) -> list[Upstream]:
        return list(self.running)

    def still_current(self, handle: str) -> bool:
        return any(u.handle == handle for u in self.running)

    def available(self, arch: Arch) -> list[str]:
        self.calls.append(f"available {arch.stap}")
        return self.releases.get(arch.stap, [])

    def provisioned(self) -> list[tuple[str, float]]:
        return sorted(self.started.items())

    def provision(self, target: Target, say: Callable[[str], None]) -> None:
        self.calls.append(f"provision {target}")
        if self.fail:
            raise KernelTreeError(self.fail)
        name = f"auto-{target.arch}-{target.release}"
        self.running.append(Upstream(name=name, host="127.0.0.1", port=1, arch=target.arch,
                                     releases=(target.release,), identity="i",
                                     tree_ids={target.release: "t"}, slots=2,
                                     handle=name, provisioned=True))
        self.started[name] = self.clock()

    def retire(self, name: str) -> None:
        self.calls.append(f"retire {name}")
        self.running = [u for u in self.running if u.name != name]
        del self.started[name]

    def version(self) -> str:
        return "5.6"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def broker(engine: FakeEngine, clock: Clock, **kw: object) -> Broker:
    engine.clock = clock
    return Broker(engine, provision_enabled=True, clock=clock, **kw)  # type: ignore[arg-type]


def test_provisions_a_release_the_mirror_lists() -> None:
    e, clock = FakeEngine(), Clock()
    b = broker(e, clock)
    assert b.provision(Target(REL, "x86_64")) == ""
    assert e.calls == ["available x86_64", f"provision {REL} x86_64"]
    assert [u.name for u in b.upstreams([])] == [f"auto-x86_64-{REL}"]


@pytest.mark.parametrize("target,reason", [
    (Target("6.0.0-nosuch-amd64", "x86_64"), "the mirror has no kernel release"),
    (Target(REL, "i386"), "architecture i386 is not one the farm serves"),
    (Target(REL, "aarch64"), "not spelt as stap does"),
    (Target("x" * 200, "x86_64"), "not a kernel release"),
    (Target("a b", "x86_64"), "not a kernel release"),
])
def test_bogus_targets_cost_no_container_work(target: Target, reason: str) -> None:
    e, clock = FakeEngine(), Clock()
    b = broker(e, clock)
    assert reason in b.provision(target)
    assert not [c for c in e.calls if c.startswith("provision")]


def test_a_thousand_distinct_bogus_releases_cost_one_mirror_listing() -> None:
    e, clock = FakeEngine(), Clock()
    b = broker(e, clock)
    for i in range(1000):
        assert b.provision(Target(f"6.0.{i}-bogus-amd64", "x86_64"))
    assert e.calls == ["available x86_64"]  # the list is cached; nothing else happened
    assert len(b._failures) <= 1024  # remembered failures are bounded


def test_failures_are_remembered_for_a_while() -> None:
    e, clock = FakeEngine(fail="download broke"), Clock()
    b = broker(e, clock)
    assert b.provision(Target(REL, "x86_64")) == "download broke"
    assert b.provision(Target(REL, "x86_64")) == "download broke"
    assert e.calls.count(f"provision {REL} x86_64") == 1
    clock.now += FAILURE_MEMORY + 1
    e.fail = ""
    assert b.provision(Target(REL, "x86_64")) == ""


def test_offer_and_switch_are_checked() -> None:
    e, clock = FakeEngine(), Clock()
    b = broker(e, clock, offer=("aarch64",))
    assert "not offered" in b.provision(Target(REL, "x86_64"))
    off = Broker(e, provision_enabled=False, clock=clock)
    assert "provisioning is off" in off.provision(Target(REL, "x86_64"))
    assert not [c for c in e.calls if c.startswith("provision")]


def test_the_provisioned_count_is_capped() -> None:
    rels = [f"6.12.{i}+tst13-amd64" for i in range(3)]
    e, clock = FakeEngine(releases={"x86_64": rels}), Clock()
    b = broker(e, clock, max_provisioned=2)
    assert b.provision(Target(rels[0], "x86_64")) == ""
    assert b.provision(Target(rels[1], "x86_64")) == ""
    assert "2 provisioned servers already run" in b.provision(Target(rels[2], "x86_64"))


def test_one_provisioning_at_a_time() -> None:
    e, clock = FakeEngine(), Clock()
    b = broker(e, clock)
    inside = threading.Event()
    release = threading.Event()
    concurrent: list[int] = []
    original = e.provision

    def slow(target: Target, say: Callable[[str], None]) -> None:
        concurrent.append(1)
        inside.set()
        release.wait(5)
        original(target, say)

    e.provision = slow  # type: ignore[method-assign]
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(b.provision(Target(REL,
                                                                                 "x86_64"))))
               for _ in range(3)]
    for t in threads:
        t.start()
    assert inside.wait(5)
    release.set()
    for t in threads:
        t.join(5)
    assert results == ["", "", ""]
    assert len(concurrent) == 1  # the two others found its server


def test_idle_provisioned_servers_are_retired() -> None:
    e, clock = FakeEngine(), Clock()
    b = broker(e, clock, idle=3600.0)
    b.provision(Target(REL, "x86_64"))
    name = f"auto-x86_64-{REL}"
    clock.now += 3000
    b.upstreams([name])  # used: the clock starts again
    clock.now += 3000
    b.refresh()
    assert name in e.started
    clock.now += 700
    b.refresh()
    assert f"retire {name}" in e.calls and not e.running


@pytest.fixture
def socket_broker(tmp_path: Path) -> Iterator[tuple[str, FakeEngine]]:
    e, clock = FakeEngine(), Clock()
    b = broker(e, clock)
    path = str(tmp_path / "broker.sock")
    stop = threading.Event()
    t = threading.Thread(target=b.serve, args=(path,), kwargs={"stop": stop}, daemon=True)
    t.start()
    poll("the broker's socket", lambda: Path(path).exists(), 5, step=0.01)
    yield path, e
    stop.set()
    t.join(5)


def test_the_front_doors_client_over_the_socket(socket_broker: tuple[str, FakeEngine]) -> None:
    path, _engine = socket_broker
    d = BrokerDirectory(path)
    assert d.hello() == "5.6"
    assert d.upstreams() == []
    d.provision(Target(REL, "x86_64"), lambda s: None)
    [u] = d.upstreams(frozenset({"x"}))
    assert u.provisioned and u.releases == (REL,)
    assert d.still_current(u)
    with pytest.raises(FarmError, match="the mirror has no kernel release"):
        d.provision(Target("6.0.0-nope-amd64", "x86_64"), lambda s: None)


@pytest.mark.parametrize("line", [b"not json\n", b"[1,2]\n", b'{"op": "rm -rf"}\n',
                                  b'{"op": "upstreams", "used": 5}\n'])
def test_garbage_on_the_socket_gets_an_error_line(socket_broker: tuple[str, FakeEngine],
                                                  line: bytes) -> None:
    import socket as so

    path, _ = socket_broker
    with so.socket(so.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(line)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, f"closed after {answer!r}"
            answer += chunk
    assert b'"ok": false' in answer


def test_an_absent_broker_is_a_farm_error(tmp_path: Path) -> None:
    with pytest.raises(FarmError, match="broker does not answer"):
        call(str(tmp_path / "none.sock"), {"op": "hello"}, 1)


def test_a_fresh_look_is_taken_when_the_front_door_found_the_table_wrong() -> None:
    # a server restarted or retired between two refreshes: the front door asks again with
    # fresh=True and must not get the same cached table (bounded: once per FRESH_INTERVAL)
    from farm.endpoint.broker import FRESH_INTERVAL

    e, clock = FakeEngine(), Clock()
    b = broker(e, clock)
    assert b.upstreams([]) == []
    e.running.append(Upstream(name="new", host="127.0.0.1", port=2, arch="x86_64",
                              releases=(REL,), identity="i", tree_ids={REL: "t"}, slots=2,
                              handle="new"))
    clock.now += FRESH_INTERVAL + 0.1
    assert b.upstreams([]) == []  # the table, kept a while
    assert b.handle({"op": "upstreams", "used": [], "fresh": True})["upstreams"][0][
        "name"] == "new"
    e.running.clear()
    clock.now += FRESH_INTERVAL / 2
    assert [u.name for u in b.upstreams([], fresh=True)] == ["new"]  # not twice a second
