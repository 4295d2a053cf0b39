"""The advertiser's decisions with a fake engine and a fake publisher (no sockets, no Docker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from farm.core import labels
from farm.core.errors import ServerError
from farm.discovery.advertiser import RECONNECT_DELAY, Advertiser
from farm.discovery.mdns import Changes, ServiceKey
from farm.engine.docker import Engine

REL = "6.12.48+tst13-arm64"


@dataclass
class FakeContainer:
    name: str
    port: int
    cmd: list[str]
    image: str = "sha256:img"
    started: str = "t0"
    id: str = ""
    execs: list[list[str]] = field(default_factory=list)
    kind: str = "server"
    extra_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id = self.id or f"id-{self.name}"

    @property
    def labels(self) -> dict[str, str]:
        return {labels.PORT: str(self.port), labels.KIND: self.kind, **self.extra_labels}

    @property
    def attrs(self) -> dict[str, Any]:
        return {"Config": {"Cmd": self.cmd, "Hostname": "farmhost"}, "Image": self.image,
                "State": {"StartedAt": self.started}}

    def exec_run(self, cmd: list[str]) -> tuple[int, bytes]:
        self.execs.append(cmd)
        if cmd[0] == "stap":
            return 0, b"Systemtap translator/driver (version 5.6/0.194, Debian version 5.6-1)\n"
        return 0, b"6.12.9-custom\n"


class FakeEngine:
    """A fake docker.DockerClient under the real Engine adapter."""

    def __init__(self) -> None:
        self.running: list[FakeContainer] = []
        self.up = True
        self.filters: list[Any] = []

    @property
    def containers(self) -> FakeEngine:
        return self

    def close(self) -> None:
        pass

    def list(self, filters: Any, all: bool = False,
             ignore_removed: bool = False) -> list[FakeContainer]:
        if not self.up:
            raise ConnectionError("engine down")
        self.filters.append(filters)
        kinds = [f.split("=", 1)[1] for f in filters.get("label", [])
                 if f.startswith(f"{labels.KIND}=")]
        return [c for c in self.running if not kinds or c.kind in kinds]


class FakePublisher:
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.live: dict[ServiceKey, Any] = {}
        self.log: list[Changes] = []
        self.foreign: set[str] = set()

    def open(self) -> None:
        pass

    def apply(self, changes: Changes) -> None:
        self.log.append(changes)
        for s in changes.remove:
            self.live.pop(s.key, None)
        for s in changes.add + changes.update:
            self.live[s.key] = s

    def published(self) -> dict[ServiceKey, str]:
        return {k: s.name for k, s in self.live.items()}

    def others(self) -> set[str]:
        return set(self.foreign)

    def withdraw_all(self) -> None:
        self.apply(Changes(remove=tuple(self.live.values())))

    def close(self) -> None:
        self.live.clear()


class FakeCert:
    def __init__(self, serial: int) -> None:
        self.serial = serial

    def get_serial_number(self) -> int:
        return self.serial


def cross(name: str = "farm-aarch64-a", port: int = 40001, **kw: Any) -> FakeContainer:
    return FakeContainer(name=name, port=port, cmd=[
        "-a", "arm64", "-r", REL, "-B", "CROSS_COMPILE=aarch64-linux-gnu-",
        "--log=/var/log/stapfarm/server.log", "--port", str(port)], **kw)


class World:
    def __init__(self) -> None:
        self.engine = FakeEngine()
        self.answering: dict[int, int] = {}  # port -> serial
        self.probes: list[tuple[str, int]] = []
        self.now = 100.0
        self.pub: FakePublisher | None = None

        def publisher(addresses: list[str]) -> FakePublisher:
            self.pub = FakePublisher(addresses)
            return self.pub

        def probe(host: str, port: int, timeout: float) -> FakeCert:
            self.probes.append((host, port))
            if port not in self.answering:
                raise ServerError("connection refused")
            return FakeCert(self.answering[port])

        self.adv = Advertiser(lambda: Engine(self.engine, "farm"), "farm", ["br0"], "127.0.0.1",
                              publisher=publisher, probe=probe, clock=lambda: self.now,
                              host_interfaces=lambda: {"br0": ["172.30.0.1"],
                                                       "lo": ["127.0.0.1"]})
        self.adv.open()

    def names(self) -> dict[str, bytes]:
        assert self.pub is not None
        return {s.name: s.txt for s in self.pub.live.values()}


def test_open_resolves_interfaces_and_filters_by_owner_label() -> None:
    w = World()
    assert w.pub is not None and w.pub.addresses == ["172.30.0.1"]
    w.adv.resync()
    assert w.engine.filters[0]["label"] == [f"{labels.OWNER}=farm", f"{labels.KIND}=server"]


def test_a_server_is_advertised_once_it_answers_tls() -> None:
    w = World()
    c = cross()
    w.engine.running.append(c)
    assert w.adv.resync() < 1  # not answering yet: retried soon
    assert w.names() == {}
    w.answering[40001] = 0xCC23FD50
    assert w.adv.resync() > 1
    assert w.names() == {"Systemtap Compile Server on farmhost": (
        b"\x21sysinfo=6.12.48+tst13-arm64 arm64"
        b"\x2aoptinfo=-BCROSS_COMPILE=aarch64-linux-gnu-"
        b"\x0bversion=5.6\x17certinfo=00:cc:23:fd:50")}
    assert w.probes[-1] == ("127.0.0.1", 40001)
    # later passes change nothing and probe no more
    probes = len(w.probes)
    w.adv.resync()
    assert len(w.probes) == probes and w.pub is not None and len(w.pub.log) == 1


def test_version_is_read_once_per_image_and_tree_releases_from_the_tree() -> None:
    w = World()
    a, b = cross(), cross("farm-aarch64-b", 40002)
    b.cmd = ["-a", "arm64", "-r", "/srv/trees/custom", "--port", "40002"]
    w.engine.running += [a, b]
    w.answering.update({40001: 1, 40002: 2})
    w.adv.resync()
    assert [cmd[0] for cmd in a.execs + b.execs].count("stap") == 1
    assert b.execs[-1] == ["cat", "/srv/trees/custom/include/config/kernel.release"]
    txts = sorted(w.names().values())
    assert any(t.startswith(b"\x1bsysinfo=6.12.9-custom arm64") for t in txts)


def test_stopped_server_is_withdrawn_and_a_restart_reprobes_the_certificate() -> None:
    w = World()
    c = cross()
    w.engine.running.append(c)
    w.answering[40001] = 1
    w.adv.resync()
    w.engine.running.clear()
    w.adv.resync()
    assert w.names() == {}
    assert w.pub is not None and [s.name for s in w.pub.log[-1].remove] == [
        "Systemtap Compile Server on farmhost"]
    # the same server started again with a new certificate: probed again, same name
    w.answering[40001] = 2
    w.engine.running.append(cross(started="t1"))
    w.now += 5
    w.adv.resync()
    assert list(w.names()) == ["Systemtap Compile Server on farmhost"]
    assert w.names()["Systemtap Compile Server on farmhost"].endswith(b"certinfo=02")


def test_a_name_just_withdrawn_is_reused_only_after_its_goodbye_expired() -> None:
    w = World()
    w.engine.running.append(cross())
    w.answering.update({40001: 1, 40002: 2})
    w.adv.resync()
    w.engine.running[:] = [cross("farm-aarch64-b", 40002)]
    assert w.adv.resync() < 1  # deferred
    assert w.names() == {}
    w.now += 2
    w.adv.resync()
    assert list(w.names()) == ["Systemtap Compile Server on farmhost"]


def test_engine_restart_withdraws_then_readvertises() -> None:
    w = World()
    w.engine.running.append(cross())
    w.answering[40001] = 1
    w.adv.resync()
    w.engine.up = False
    w.adv.resync()
    assert w.names() == {} and not w.adv.engine_up
    w.engine.up = True
    w.now += 2
    w.adv.resync()
    assert list(w.names()) == ["Systemtap Compile Server on farmhost"]


def test_names_held_by_another_host_are_skipped() -> None:
    w = World()
    assert w.pub is not None
    w.pub.foreign = {"systemtap compile server on farmhost"}
    w.engine.running.append(cross())
    w.answering[40001] = 1
    w.adv.resync()
    assert list(w.names()) == ["Systemtap Compile Server on farmhost #2"]


def test_a_failing_publisher_never_crashes_the_advertiser() -> None:
    w = World()
    assert w.pub is not None

    def boom(changes: Changes) -> None:
        raise OSError("network is down")

    real = w.pub.apply
    w.pub.apply = boom  # type: ignore[method-assign]
    w.engine.running.append(cross())
    w.answering[40001] = 1
    assert w.adv.resync() == RECONNECT_DELAY  # the failure is retried soon, not raised
    assert w.adv.published() == {} and w.names() == {}
    w.pub.apply = real  # type: ignore[method-assign]
    w.adv.resync()  # the network is back: the service goes out
    assert list(w.names()) == ["Systemtap Compile Server on farmhost"]


def test_advertiser_container_spec() -> None:
    from docker.types import Mount

    from farm.engine.service_specs import advertiser_spec as container_spec

    spec = container_spec("stapfarm/service:latest", "sha256:1", "farm", ["br0", "10.0.0.5"],
                          "127.0.0.1", test_label="t1")
    digest = spec["labels"].pop(labels.SPEC_HASH)
    assert spec == {
        "image": "stapfarm/service:latest",
        "name": "farm-advertiser",
        "command": ["--prefix", "farm", "--probe-address", "127.0.0.1",
                    "--interface", "br0", "--interface", "10.0.0.5"],
        "network_mode": "host",
        "mounts": [Mount("/var/run/docker.sock", "/var/run/docker.sock", type="bind")],
        "restart_policy": {"Name": "unless-stopped"},
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": "128m",
        "pids_limit": 64,
        "stop_signal": "SIGTERM",
        "labels": {labels.OWNER: "farm", labels.KIND: "advertiser", labels.TEST: "t1"},
    }
    other_image = container_spec("stapfarm/service:latest", "sha256:2", "farm",
                                 ["br0", "10.0.0.5"], "127.0.0.1", test_label="t1")
    assert other_image["labels"][labels.SPEC_HASH] != digest  # a rebuilt image: recreate
    same = container_spec("stapfarm/service:latest", "sha256:1", "farm",
                          ["br0", "10.0.0.5"], "127.0.0.1", test_label="t2")
    assert same["labels"][labels.SPEC_HASH] == digest  # labels are not the spec


def test_a_running_endpoint_is_advertised_per_arch_instead_of_its_servers() -> None:
    w = World()
    native = FakeContainer(name="farm-x86", port=40002, cmd=[
        "-a", "x86_64", "-r", "6.12.9+tst13-amd64", "--port", "40002"])
    w.engine.running += [cross(), native]
    w.answering.update({40001: 0xCC23FD50, 40002: 0xCC23FD50})
    w.adv.resync()
    assert {s.port for s in w.pub.live.values()} == {40001, 40002}  # type: ignore[union-attr]
    endpoint = FakeContainer(name="farm-endpoint", port=5100, cmd=[], kind="endpoint",
                             extra_labels={labels.OFFERS: "arm64:6.12.1+tst13-arm64"})
    w.engine.running.append(endpoint)
    w.answering[5100] = 0xCC23FD50
    for _ in range(2):  # names just withdrawn are reused one pass later (as avahi)
        w.now += 100
        w.adv.resync()
    assert w.pub is not None
    live = list(w.pub.live.values())
    assert {s.port for s in live} == {5100}
    sysinfos = sorted(_sysinfo(s.txt) for s in live)
    assert sysinfos == sorted([f"sysinfo={REL} arm64", "sysinfo=6.12.1+tst13-arm64 arm64",
                               "sysinfo=6.12.9+tst13-amd64 x86_64"])
    assert all("certinfo=00:cc:23:fd:50" in s.txt.decode() for s in live)
    # The endpoint gone: the servers themselves again.
    w.engine.running.remove(endpoint)
    w.now += 100
    w.adv.resync()
    w.now += 100
    w.adv.resync()
    assert {s.port for s in w.pub.live.values()} == {40001, 40002}


def _sysinfo(txt: bytes) -> str:
    """The first TXT string (length-prefixed)."""
    return txt[1:1 + txt[0]].decode()
