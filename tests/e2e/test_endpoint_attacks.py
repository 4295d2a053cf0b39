"""Issue 15: the farm endpoint as a trust boundary — one test per finding of the review,
through the real endpoint (front door and broker containers), a real farm server, a raw TLS
peer for what no real client sends, and the Debian 13 `stap` 5.1 client, which must still
compile after every attack.

Provisioning is on with no ENDPOINT_OFFER (the configuration the amplification finding was
about); ENDPOINT_WRITE_TIMEOUT is short so that the slow-reader test is quick.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from farm.core import labels
from farm.core.arch import X86_64
from farm.endpoint import containers as service
from farm.engine import service_specs
from tests.e2e.test_endpoint import endpoint_logs
from tests.support.client import authorize_cert, client_stap, default_host_names, start_client
from tests.support.elf import elf_machine
from tests.support.farm import Farm, make_farm
from tests.support.poll import poll
from tests.support.trees import KernelTrees
from tests.support.wire_client import client_context, exchange
from tests.support.zip_attacks import longer_stream, unicode_rename, unzip_read

pytestmark = [pytest.mark.docker, pytest.mark.slow]

WRITE_TIMEOUT = 5
PER_SOURCE = 64  # ENDPOINT_MAX_PER_SOURCE: the 50 concurrent requests below come from one host
SERVER_HOME = "/home/stap-server"  # the server user's home inside a server container


def say(text: str) -> None:
    print(f"[attacks] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Door:
    farm: Farm
    port: int
    metrics_port: int
    release: str
    extra: str
    docker: Any

    @property
    def prefix(self) -> str:
        return self.farm.env["STAPFARM_PREFIX"]

    def metrics(self) -> dict[str, float]:
        return service.metrics(self.metrics_port)

    def sample(self, name: str, **want: str) -> float:
        """The metric NAME's sample with the label values WANT (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        return sum(s.value for fam in text_string_to_metric_families(text)
                   for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in want.items()))

    def compile_ok(self, tag: str) -> None:
        """The real client still gets a correct module through the endpoint."""
        rc, out, modules = client_stap(self.farm.client, [
            f"--use-server={self.farm.host}:{self.port}", "-a", "x86_64", "-r", self.release,
            "-p4", "-m", "after", "-e", f'probe begin {{ println("after {tag}"); exit() }}'])
        assert rc == 0, out
        assert elf_machine(modules["after.ko"]) == X86_64.elf_machine
        assert f"after {tag}".encode() in modules["after.ko"]

    def restart(self, extra: str) -> None:
        """The endpoint again, with EXTRA global lines (after the fixture's)."""
        rc, out, err = self.farm.run("endpoint", "stop")
        assert rc == 0, out + err
        gfile = Path(self.farm.env["STAPFARM_CONFIG_FILE"])
        text = gfile.read_text()
        gfile.write_text(text.split("# --- attack extra\n")[0] + "# --- attack extra\n" + extra)
        rc, out, err = self.farm.run("endpoint", "start")
        assert rc == 0, out + err

    def container(self, kind: str = "endpoint") -> Any:
        name = (service_specs.frontdoor_name if kind == "endpoint"
                else service_specs.broker_name)(self.prefix)
        return self.docker.containers.get(name)


def framed(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


def entries(release: str, argv: list[str], extra: dict[str, bytes] | None = None
            ) -> dict[str, bytes]:
    """A request's entries as the real client writes them (stap-protocol.md §3.3)."""
    out = {"version": b"5.1", "sysinfo": f"sysinfo: {release} x86_64".encode(),
           "locale": b"LANG=C.UTF-8\n"}
    out.update({f"argv{i}": a.encode() for i, a in enumerate(argv, 1)})
    out.update(extra or {})
    return out


def zipped(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def answer(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist() if not n.endswith("/")}


@pytest.fixture(scope="module")
def door(docker_client: Any, kernel_trees: KernelTrees, farm_environ: dict[str, str],
         session_dir: Path, test_network: Any, test_label: str) -> Iterator[Door]:
    kernel_trees.tree(X86_64, X86_64)
    rel = kernel_trees.release(X86_64)
    port, mport = _free_port(), _free_port()
    client = start_client(docker_client, test_network, test_label)
    extra = (f"ENDPOINT_PORT={port}\nENDPOINT_METRICS_PORT={mport}\nENDPOINT_PROVISION=yes\n"
             f"ENDPOINT_WRITE_TIMEOUT={WRITE_TIMEOUT}\nENDPOINT_IDLE_TIMEOUT=8\n"
             f"ENDPOINT_MAX_PER_SOURCE={PER_SOURCE}\n# --- attack extra\n")
    f = make_farm(session_dir / "attacks", farm_environ, client, default_host_names()[0],
                  {"x86_64": rel}, extra=extra)
    try:
        rc, out, err = f.run("start", "-a", "x86_64", "-r", rel, "-n", "atk")
        assert rc == 0, out + err
        rc, out, err = f.run("endpoint", "start")
        assert rc == 0, out + err
        authorize_cert(client, f.farm_cert())
        yield Door(f, port, mport, rel, extra, docker_client)
    finally:
        say(endpoint_logs(docker_client, f.env["STAPFARM_PREFIX"], tail=30))
        f.run("endpoint", "stop")
        f.run("stop")
        client.remove(force=True)


# --------------------------------------------------------------------------- 1 poisoning


@pytest.mark.parametrize("kind", ["longer_stream", "unicode_path"])
def test_a_parser_differential_cannot_poison_the_cache(door: Door, kind: str) -> None:
    mark = uuid.uuid4().hex[:12]
    benign_script = f'-eprobe begin {{ println("benign-{mark}"); exit() }}'
    benign = entries(door.release, ["-p4", "-mpoison", benign_script])
    evil_tail = f' probe begin {{ println("EVIL-{mark}") }}'.encode()
    if kind == "longer_stream":
        attack = longer_stream(benign, "argv3", evil_tail)
    else:
        attack = unicode_rename(benign, "zzz", "argv3", benign_script.encode() + evil_tail)
    # The attack is real: the server's unzip reads the evil script where Python reads the
    # benign one (what the endpoint validated and keyed before issue 15).
    seen_by_unzip = unzip_read(attack)["argv3"]
    assert f"EVIL-{mark}".encode() in seen_by_unzip
    assert zipfile.ZipFile(io.BytesIO(attack)).read("argv3") == benign_script.encode()

    refused = answer(exchange(door.port, framed(attack), timeout=120))
    assert refused["rc"] == b"1", refused
    assert b"Server: request entry" in refused["stderr"]
    say(f"{kind}: " + refused["stderr"].decode().strip())
    # The victim sends the benign request: built (or cached) from the benign script only.
    got = answer(exchange(door.port, framed(zipped(benign)), timeout=600))
    assert got["rc"] == b"0", got.get("stderr")
    module = got["stap000000/poison.ko"]
    assert f"benign-{mark}".encode() in module and b"EVIL-" not in module
    door.compile_ok(kind)


# --------------------------------------------------------------------------- 2 key theft


def _incbin(path: str) -> str:
    return ('%{\nasm(".pushsection .rodata.leak,\\"a\\"\\n.incbin \\"' + path
            + '\\"\\n.popsection\\n");\n%}\nprobe begin { exit() }')


def test_the_farm_key_is_out_of_every_compiles_reach(door: Door) -> None:
    farm_key = door.farm.root / "state/endpoint/identity/key4.db"
    server_key = door.farm.root / "state/home/stap-server/.systemtap/ssl/server/key4.db"
    assert farm_key.read_bytes() != server_key.read_bytes()
    # Default policy: guru mode is refused at the door, through the real client too.
    rc, out, _ = client_stap(door.farm.client, [
        f"--use-server={door.farm.host}:{door.port}", "-a", "x86_64", "-r", door.release,
        "-p4", "-g", "-m", "leak", "-e", _incbin(f"{SERVER_HOME}/.systemtap/ssl/server/key4.db")])
    assert rc != 0 and "Server: guru mode (-g) is refused" in out, out
    # No server container mounts the farm's identity.
    for c in door.docker.containers.list(filters={"label": [
            f"{labels.OWNER}={door.prefix}", f"{labels.KIND}=server"]}):
        sources = [m.get("Source", "") + " " + m.get("Name", "") for m in c.attrs["Mounts"]]
        assert not any("endpoint" in s for s in sources), sources
    # An operator allows guru mode: a compile still reaches only the server's own key.
    door.restart("ENDPOINT_POLICY=allow-guru\n")
    try:
        for path in (service_specs.IDENTITY_MOUNT + "/key4.db", str(farm_key)):
            got = answer(exchange(door.port, framed(zipped(entries(
                door.release, ["-p4", "-g", "-mleak", f"-e{_incbin(path)}"]))), timeout=600))
            assert got["rc"] != b"0", got
            assert f"file not found: {path}".encode() in got["stderr"], got["stderr"]
        got = answer(exchange(door.port, framed(zipped(entries(
            door.release, ["-p4", "-g", "-mleak",
                           f"-e{_incbin(SERVER_HOME + '/.systemtap/ssl/server/key4.db')}"]))),
            timeout=600))
        assert got["rc"] == b"0", got.get("stderr")
        module = got["stap000000/leak.ko"]
        assert server_key.read_bytes() in module  # what upstream's model exposes ...
        assert farm_key.read_bytes() not in module  # ... never the farm's key
        door.compile_ok("guru allowed")
    finally:
        door.restart("")


def test_stapusr_modules_are_signed_by_the_farm(door: Door, tmp_path: Path) -> None:
    rc, out, err = door.farm.run("trust", "--export", str(tmp_path / "trust"))
    assert rc == 0, out + err
    farm_cert = x509.load_der_x509_certificate(door.farm.farm_cert())
    exported = [x509.load_der_x509_certificate(p.read_bytes())
                for p in (tmp_path / "trust").glob("*.cert")]
    assert farm_cert in exported
    rc, out, modules = client_stap(door.farm.client, [
        f"--use-server={door.farm.host}:{door.port}", "-a", "x86_64", "-r", door.release,
        "-p4", "--privilege=stapusr", "-e", 'probe begin { println("usr") }'])
    assert rc == 0, out
    name = next(n for n in modules if n.endswith(".ko"))
    ko, sgn = modules[name], modules[name + ".sgn"]
    farm_key: Any = farm_cert.public_key()
    farm_key.verify(sgn, ko, padding.PKCS1v15(), hashes.SHA256())
    server_key: Any = x509.load_der_x509_certificate(door.farm.cert()).public_key()
    with pytest.raises(InvalidSignature):
        server_key.verify(sgn, ko, padding.PKCS1v15(), hashes.SHA256())


# --------------------------------------------------------------------------- 3 memory


def _peak_memory(container: Any, stop: threading.Event, peaks: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):  # a sample missed is not a failure
            stats = container.stats(stream=False)
            peaks.append(int(stats["memory_stats"].get("usage", 0)))
        stop.wait(0.2)


def test_fifty_large_requests_stay_within_the_memory_limit_and_are_answered(
        door: Door) -> None:
    front = door.container()
    limit = int(front.attrs["HostConfig"]["Memory"])
    restarts = int(front.attrs["RestartCount"])
    bodies = [zipped(entries(door.release, ["-p4", "-I", "tapset/big", "-e probe begin {}"],
                             {"tapset/big/noise.stp": os.urandom(12 << 20)}))
              for _ in range(50)]
    assert all(12 << 20 < len(b) <= 16 << 20 for b in bodies)
    peaks: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_peak_memory, args=(front, stop, peaks), daemon=True)
    sampler.start()
    results: list[bytes | Exception] = []

    def send(body: bytes) -> None:
        try:
            results.append(exchange(door.port, framed(body), timeout=900))
        except Exception as e:  # noqa: BLE001 - reported below
            results.append(e)

    t0 = time.monotonic()
    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    stop.set()
    sampler.join(5)
    failures = [r for r in results if isinstance(r, Exception) or not r]
    assert len(results) == 50 and not failures, failures[:3]
    rcs = [answer(r)["rc"] for r in results if isinstance(r, bytes)]
    assert all(rc in (b"0", b"1") for rc in rcs)
    front.reload()
    assert front.attrs["State"]["OOMKilled"] is False
    assert int(front.attrs["RestartCount"]) == restarts
    say(f"50 x 12 MiB requests answered in {time.monotonic() - t0:.0f} s; endpoint memory "
        f"peak {max(peaks) / 2**20:.0f} MiB of its {limit / 2**20:.0f} MiB limit "
        f"({len(peaks)} samples); rc: {sorted(set(rcs))}")
    assert max(peaks) < limit
    door.compile_ok("memory")


# --------------------------------------------------------------------------- 4 slow peers


def test_a_client_that_never_reads_is_cut_at_the_write_deadline(door: Door) -> None:
    # -p1 prints the parsed script: an answer as large as the (incompressible) script, more
    # than loopback's socket buffers hold. A reading client gets it built and cached first,
    # so the non-reading one is answered at once, from the cache. The script goes as a file,
    # as the client sends `stap FILE` (one -e argument cannot exceed 128 KiB: execve).
    lines = [f'println("{secrets.token_urlsafe(300)}")' for _ in range(30000)]
    script = ("probe begin {\n" + "\n".join(lines) + "\n}\n").encode()
    path = "script/tmp/slow-reader/big.stp"
    body = zipped(entries(door.release, [path, "-p1"], {path: script}))
    assert len(body) < 16 << 20
    full = exchange(door.port, framed(body), timeout=600)
    got = answer(full)
    assert got.get("rc") == b"0", {n: v[:300] for n, v in got.items()}
    assert len(full) > 8 << 20, len(full)
    before = door.sample("stapfarm_endpoint_timeouts_total", phase="write")
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    raw.settimeout(60)
    raw.connect(("127.0.0.1", door.port))
    tls = client_context().wrap_socket(raw)
    try:
        tls.sendall(framed(body))
        t0 = time.monotonic()
        poll("the endpoint cut the non-reading client off", lambda: door.sample(
            "stapfarm_endpoint_timeouts_total", phase="write") > before, 120, step=0.5)
        say(f"non-reading client cut off {time.monotonic() - t0:.1f} s after its request "
            f"(answer {len(full) / 2**20:.1f} MiB, ENDPOINT_WRITE_TIMEOUT={WRITE_TIMEOUT})")
        received = 0
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, TimeoutError)):
            while chunk := tls.recv(1 << 20):  # what was in flight, then the reset
                received += len(chunk)
            raise ConnectionError("closed")
        assert received < len(full)
    finally:
        tls.close()
    door.compile_ok("slow reader")


def test_connections_from_one_address_are_capped(door: Door) -> None:
    held: list[ssl.SSLSocket] = []
    refused_after = 0
    try:
        for _ in range(PER_SOURCE + 16):
            s = client_context().wrap_socket(
                socket.create_connection(("127.0.0.1", door.port), timeout=10))
            held.append(s)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        say(f"connection {len(held) + 1} refused: {e}")
    finally:
        poll("connections over the cap refused", lambda: door.sample(
            "stapfarm_endpoint_connections_refused_total", reason="source") >= 1, 30)
        refused_after = len(held)
        for s in held:
            s.close()
    # the refused ones are closed at once (a handshake may still complete before the close)
    say(f"{PER_SOURCE + 16} connections from one address: {refused_after} handshakes, "
        f"{door.sample('stapfarm_endpoint_connections_refused_total', reason='source'):.0f} "
        "refused")
    door.compile_ok("per source")


# --------------------------------------------------------------------------- 5 provisioning


def test_a_thousand_bogus_releases_cost_no_container(door: Door) -> None:
    since = int(time.time())
    front = door.container()
    mem_before = int(front.stats(stream=False)["memory_stats"].get("usage", 0))
    containers_before = {c.id for c in door.docker.containers.list(all=True)}
    t0 = time.monotonic()
    for i in range(1000):
        body = zipped(entries(f"6.{i}.0-bogus{secrets.token_hex(4)}-amd64", ["-p4", "-e x"]))
        got = answer(exchange(door.port, framed(body), timeout=60))
        assert got["rc"] == b"1"
        if i == 0:
            say("bogus release answer: " + got["stderr"].decode().strip())
    took = time.monotonic() - t0
    events = list(door.docker.events(since=since, until=int(time.time()) + 1, decode=True,
                                     filters={"type": "container", "event": "create"}))
    assert not events, [e.get("Actor", {}).get("Attributes", {}).get("name") for e in events]
    assert {c.id for c in door.docker.containers.list(all=True)} == containers_before
    mem_after = int(front.stats(stream=False)["memory_stats"].get("usage", 0))
    text = urllib.request.urlopen(f"http://127.0.0.1:{door.metrics_port}/metrics").read()
    assert b"bogus" not in text  # no label per made-up release
    say(f"1000 bogus releases answered in {took:.0f} s; no container created; endpoint "
        f"memory {mem_before / 2**20:.0f} -> {mem_after / 2**20:.0f} MiB")
    assert mem_after - mem_before < 64 << 20
    door.compile_ok("bogus releases")


# --------------------------------------------------------------------------- 6, 7 posture


def test_the_metrics_port_answers_on_loopback_only(door: Door, gateway: str) -> None:
    assert urllib.request.urlopen(f"http://127.0.0.1:{door.metrics_port}/metrics",
                                  timeout=5).status == 200
    address = gateway  # this host's address on the test's own bridge
    assert not address.startswith("127.")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{address}:{door.metrics_port}/metrics", timeout=5)


def test_the_front_door_is_unprivileged_and_has_no_docker_socket(door: Door) -> None:
    front, broker = door.container(), door.container("broker")
    user = front.attrs["Config"]["User"]
    assert user and not user.startswith("0") and user != "root"
    host = front.attrs["HostConfig"]
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    assert not host.get("CapAdd") and "no-new-privileges" in host["SecurityOpt"]
    mounts = {m["Destination"]: m for m in front.attrs["Mounts"]}
    assert service_specs.DOCKER_SOCKET not in mounts
    assert mounts[service_specs.ENDPOINT_MOUNT]["RW"] is False
    _, out = front.exec_run(["sh", "-c", ("grep -E '^(Uid|CapEff|NoNewPrivs)' /proc/1/status;"
                                          " ls -l /var/run/docker.sock")])
    text = out.decode()
    assert "CapEff:\t0000000000000000" in text and "NoNewPrivs:\t1" in text
    assert "No such file" in text
    assert not broker.attrs["HostConfig"].get("PortBindings")
    say("front door: " + " ".join(text.split()))
    identity = door.farm.root / "state/endpoint/identity"
    st = identity.stat()
    assert st.st_mode & 0o077 == 0 and str(st.st_uid) == user.split(":")[0]
    digest = hashlib.sha256(door.farm.farm_cert()).hexdigest()[:16]
    say(f"farm identity {identity} mode {st.st_mode & 0o777:o}, uid {st.st_uid}, cert {digest}")
