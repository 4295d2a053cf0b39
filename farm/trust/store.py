"""Trust in the farm's servers: export their certificates, install or revoke them in the
NSS databases stap clients and staprun read (certutil, run from the farm's image)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from farm.core import labels
from farm.core.backend import RunningServer
from farm.core.errors import FarmError
from farm.trust import tls as tlsprobe


class Engine(Protocol):
    """What trust needs of the farm's engine (farm/engine/docker.py's Engine has it)."""

    def containers(self, kind: str, *, running: bool = False,
                   having: Iterable[str] = ()) -> list[Any]: ...

    def job(self, image: str, command: list[str] | None = None, *, what: str,
            entrypoint: list[str] | None = None, **kw: Any) -> str: ...


GLOBAL_CLIENT_DB = "/etc/systemtap/ssl/client"
SIGNER_DB = "/etc/systemtap/staprun"
SCRIPT = "trust-farm.sh"


@dataclass(frozen=True)
class ServerCert:
    """One certificate the farm's servers present (several servers may share it)."""

    der: bytes
    serial: int
    servers: tuple[str, ...]  # nicknames

    @property
    def certinfo(self) -> str:
        return tlsprobe.certinfo(self.serial)

    @property
    def pem(self) -> bytes:
        return x509.load_der_x509_certificate(self.der).public_bytes(Encoding.PEM)


def collect(servers: list[RunningServer], address: str = "127.0.0.1") -> list[ServerCert]:
    """The live certificates of SERVERS (read over TLS, never guessed), one per serial.

    Raises:
        ServerError: a server did not answer.
    """
    by_serial: dict[int, tuple[bytes, list[str]]] = {}
    for s in servers:
        if not s.running:
            continue
        cert = tlsprobe.probe(address, s.port, timeout=10)
        der = cert.to_cryptography().public_bytes(Encoding.DER)
        entry = by_serial.setdefault(cert.get_serial_number(), (der, []))
        entry[1].append(s.nickname)
    return [ServerCert(der=d, serial=serial, servers=tuple(n))
            for serial, (d, n) in sorted(by_serial.items())]


def endpoint_cert(engine: Engine, address: str = "127.0.0.1") -> ServerCert | None:
    """The certificate the farm's running endpoint presents (the farm's identity), read
    over TLS; None when no endpoint runs.

    Raises:
        ServerError: it runs but does not answer.
    """
    found = engine.containers("endpoint", running=True)
    if not found:
        return None
    port = int(found[0].labels.get(labels.PORT, "0") or 0)
    cert = tlsprobe.probe(address, port, timeout=10)
    return ServerCert(der=cert.to_cryptography().public_bytes(Encoding.DER),
                      serial=cert.get_serial_number(), servers=("endpoint",))


_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*")


def check_host(host: str) -> str:
    """HOST, when it is a DNS name (it is written into file names and a script users run as
    root).

    Raises:
        FarmError: anything else (a `/`, a quote, a newline, ...).
    """
    if len(host) > 253 or not _HOST.fullmatch(host):
        raise FarmError(f"host name {host[:80]!r} is not a DNS name; set STAPFARM_HOSTNAME "
                        "to the name clients use for this host")
    return host


def script_text(host: str) -> str:
    """The trust script for HOST's farm.

    Raises:
        FarmError: HOST is not a DNS name.
    """
    text = resources.files("farm.trust").joinpath("trust_script.sh").read_text()
    return text.replace("@HOST@", check_host(host))


def export(certs: list[ServerCert], directory: Path, host: str) -> list[Path]:
    """Write each certificate (DER `.cert`, as stap-authorize-cert takes, and `.pem`), the
    trust script and instructions into DIRECTORY. Returns the files written.

    Raises:
        FarmError: HOST is not a DNS name.
    """
    check_host(host)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for c in certs:
        stem = f"{host}-{c.certinfo.replace(':', '')}"
        for suffix, data in ((".cert", c.der), (".pem", c.pem)):
            path = directory / f"{stem}{suffix}"
            path.write_bytes(data)
            written.append(path)
    script = directory / SCRIPT
    script.write_text(script_text(host))
    script.chmod(0o755)
    readme = directory / "README.txt"
    readme.write_text(
        f"Compile servers of {host} (stapfarm). On each client host, as the user who runs stap:\n"
        f"    sh {SCRIPT}                 # trust them for this user\n"
        f"    sudo sh {SCRIPT} --all-users   # for every user\n"
        f"    sudo sh {SCRIPT} --signer      # let staprun load modules they signed\n"
        f"    sh {SCRIPT} --revoke        # stop trusting them\n"
        "Needs certutil (Debian: libnss3-tools). Serials (certinfo):\n"
        + "".join(f"    {c.certinfo}  ({', '.join(c.servers)})\n" for c in certs))
    written += [script, readme]
    return written


def apply(engine: Engine, image: str, certs: list[ServerCert], db: str, *, revoke: bool,
          uid: int, gid: int, host: str) -> str:
    """Install (or revoke) CERTS in the NSS database DB on this host; return the script's
    output. Runs the exported script in the farm's image, as UID, with DB mounted.

    Raises:
        ServerError: certutil failed.
    """
    os.makedirs(db, mode=0o700 if not db.startswith("/etc/") else 0o755, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stapfarm-trust-") as tmp:
        export(certs, Path(tmp), host)
        os.chmod(tmp, 0o755)
        for f in Path(tmp).iterdir():
            f.chmod(0o644 if f.suffix != ".sh" else 0o755)
        args = ["--db", db] + (["--revoke"] if revoke else [])
        return engine.job(image, args, what=f"updating {db}",
                          entrypoint=["/bin/sh", f"/in/{SCRIPT}"], user=f"{uid}:{gid}",
                          environment={"HOME": "/tmp"}, network_mode="none",
                          volumes={tmp: {"bind": "/in", "mode": "ro"},
                                   db: {"bind": db, "mode": "rw"}})
