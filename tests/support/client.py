"""A Debian 13 (trixie) workstation for end-to-end tests: the stap 5.1 client users have.

    tag = ensure_client_image(docker_client)       # stapfarm-test/client:trixie
    c = start_client(docker_client, network, test_label, {"farmhost": "gateway"})
    authorize_cert(c, server_cert_bytes)           # trust a compile server, the 5.1 way
    start_avahi(c)                                 # only for mDNS discovery tests
    rc, output, modules = client_stap(c, ["--use-server=farmhost:5000", "-p4", ...])

The image (tests/support/Dockerfile.client) is built from `stapfarm/base:trixie-amd64`,
bootstrapped with images/bootstrap-base.sh when missing (no registry here), and rebuilt only
when the Dockerfile or the mirror changes (its hash is the image's org.stapfarm.inputs-hash
label). Debian's `systemtap-client` package holds no `stap`: the front end is in `systemtap`,
which a user of the client installs too, so the image carries both.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import ssl
import subprocess
import tarfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from farm.core import labels
from tests.support.poll import wait_until

CLIENT_TAG = "stapfarm-test/client:trixie"
BASE_TAG = "stapfarm/base:trixie-amd64"
DOCKERFILE = Path(__file__).with_name("Dockerfile.client")
REPO = Path(__file__).resolve().parent.parent.parent
USER = "alice"
HOME = f"/home/{USER}"
CLIENT_DB = f"{HOME}/.systemtap/ssl/client"
AUTHORIZE = "/usr/lib/systemtap/stap-authorize-cert"


def _mirror() -> str:
    """The farm's resolved Debian mirror (global file, else the host's apt sources).

    Raises:
        RuntimeError: neither names one.
    """
    from farm.core.errors import ConfigError
    from farm.kernels.mirror import HINT, host_debian_mirror
    from farm.manual.config import load_global

    try:
        url = load_global([], os.environ).debian_mirror
    except ConfigError:  # configuration is not what the client image is about
        url = host_debian_mirror()
    if not url:
        raise RuntimeError(f"no Debian mirror for the client image: {HINT}")
    return url


def inputs_hash(mirror: str) -> str:
    h = hashlib.sha256(DOCKERFILE.read_bytes())
    h.update(f"\0BASE_IMAGE={BASE_TAG}\0DEBIAN_MIRROR={mirror}\0".encode())
    return h.hexdigest()[:16]


def _image(client: Any, tag: str) -> Any:
    import docker.errors

    try:
        return client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None


def ensure_client_image(docker_client: Any) -> str:
    """The client image's tag, built (and its base bootstrapped) when missing or outdated.

    Raises:
        RuntimeError: bootstrapping the base or building the image failed (with its output).
    """
    mirror = _mirror()
    want = inputs_hash(mirror)
    image = _image(docker_client, CLIENT_TAG)
    if image is not None and (image.labels or {}).get(labels.IMAGE_INPUTS) == want:
        return CLIENT_TAG
    if _image(docker_client, BASE_TAG) is None:
        proc = subprocess.run(["bash", str(REPO / "images" / "bootstrap-base.sh"), "trixie",
                               "amd64", BASE_TAG, mirror], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"bootstrapping {BASE_TAG} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
    tail: list[str] = []
    error = ""
    for chunk in docker_client.api.build(
            fileobj=io.BytesIO(DOCKERFILE.read_bytes()), tag=CLIENT_TAG, rm=True, forcerm=True,
            pull=False, buildargs={"BASE_IMAGE": BASE_TAG, "DEBIAN_MIRROR": mirror},
            labels={labels.IMAGE_INPUTS: want}, decode=True):
        if "error" in chunk:
            error = str(chunk["error"]).strip()
        for line in str(chunk.get("stream", "")).splitlines():
            if line.strip():
                tail = (tail + [line])[-20:]
    if error:
        raise RuntimeError(f"building {CLIENT_TAG} failed: {error}\n" + "\n".join(tail))
    return CLIENT_TAG


def _network(docker_client: Any, network: Any) -> Any:
    net = docker_client.networks.get(network) if isinstance(network, str) else network
    net.reload()
    return net


def network_gateway(docker_client: Any, network: Any) -> str:
    """The gateway address of NETWORK (a Network or its name): the host as seen from it."""
    net = _network(docker_client, network)
    for cfg in net.attrs.get("IPAM", {}).get("Config") or []:
        if cfg.get("Gateway"):
            return str(cfg["Gateway"])
    raise RuntimeError(f"network {net.name} has no gateway address")


# The host name of this test session's farms (their STAPFARM_HOSTNAME): their certificates
# and mDNS services name it, and the client containers resolve it to the host. A name of their
# own, so that a farm already running on this host (`make up`, which uses the machine's name)
# neither renames the tests' services nor is mistaken for them.
TEST_HOST = f"farmtest-{uuid.uuid4().hex[:8]}"


def default_host_names() -> list[str]:
    """The names this session's farms are known by (STAPFARM_HOSTNAME of farm_environ)."""
    return [TEST_HOST]


def start_client(docker_client: Any, network: Any, test_label: str,
                 hostname_aliases: Mapping[str, str] | None = None) -> Any:
    """Start a long-running client container on NETWORK, labelled with TEST_LABEL.

    HOSTNAME_ALIASES maps host names to addresses for the container's /etc/hosts; the address
    "gateway" stands for NETWORK's gateway (the host, where the farm publishes its ports).
    None maps this host's own names to the gateway.
    """
    net = _network(docker_client, network)
    gateway = network_gateway(docker_client, net)
    aliases = (dict(hostname_aliases) if hostname_aliases is not None
               else {name: "gateway" for name in default_host_names()})
    extra_hosts = {name: gateway if addr in ("gateway", "") else addr
                   for name, addr in aliases.items()}
    return docker_client.containers.run(
        ensure_client_image(docker_client), detach=True, network=net.name,
        hostname=f"client-{uuid.uuid4().hex[:6]}", extra_hosts=extra_hosts,
        labels={labels.TEST: test_label, labels.KIND: "client"})


def _uid(container: Any, user: str = USER) -> int:
    code, out = container.exec_run(["id", "-u", user])
    if code != 0:
        raise RuntimeError(f"no user {user} in {container.name}: {out.decode().strip()}")
    return int(out.decode().strip())


def _put(container: Any, directory: str, files: Mapping[str, bytes | str], uid: int,
         top: str | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        prefix = ""
        if top:
            d = tarfile.TarInfo(top)
            d.type, d.mode, d.uid, d.gid = tarfile.DIRTYPE, 0o755, uid, uid
            tar.addfile(d)
            prefix = f"{top}/"
        for name, data in files.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(prefix + name)
            info.size, info.mode, info.uid, info.gid = len(raw), 0o644, uid, uid
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(raw))
    if not container.put_archive(directory, buf.getvalue()):
        raise RuntimeError(f"could not copy files into {container.name}:{directory}")


def _exec(container: Any, cmd: list[str], user: str = "root",
          timeout: float = 120) -> tuple[int, str]:
    """Run CMD in CONTAINER, polling for its end until TIMEOUT; (exit code, output).

    Output goes through a file, so a long quiet command is not cut off by the Docker client's
    read timeout.
    """
    api = container.client.api
    token = uuid.uuid4().hex[:10]
    out = f"/tmp/.exec-{token}"
    script = 'out=$1; shift; "$@" > "$out" 2>&1; echo $? >> "$out.rc"'
    exec_id = api.exec_create(container.id, ["sh", "-c", script, "sh", out, *cmd], user=user,
                              environment={"HOME": HOME if user == USER else "/root",
                                           "LANG": "C.UTF-8"})["Id"]
    api.exec_start(exec_id, detach=True)
    if not wait_until(lambda: not api.exec_inspect(exec_id)["Running"], timeout, 0.25):
        # the command is left to the container's removal
        return 124, _read(container, out) + f"\n[no result after {timeout:.0f} s]"
    rc_text = _read(container, f"{out}.rc").strip()
    output = _read(container, out)
    container.exec_run(["rm", "-f", out, f"{out}.rc"])
    return (int(rc_text) if rc_text.isdigit() else 255), output


def _read(container: Any, path: str) -> str:
    import docker.errors

    try:
        stream, _ = container.get_archive(path)
    except docker.errors.NotFound:
        return ""
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.next()
        f = tar.extractfile(member) if member else None
        return f.read().decode("utf-8", "replace") if f else ""


def authorize_cert(container: Any, cert: bytes) -> str:
    """Trust a compile server's certificate (PEM or DER) for alice, as a 5.1 client must.

    `stap --trust-servers=ssl` cannot add trust on current Debian (clients <= 5.1 with
    NSS >= 3.101: SEC_ERROR_UNKNOWN_ISSUER), so do what works: put the server's stap.cert
    (DER) in alice's home and run `stap-authorize-cert stap.cert ~/.systemtap/ssl/client` as
    alice. The tool's exit status is inverted upstream (`return secStatus == SECSuccess`: 1 on
    success, 0 on failure), so success is read from the database instead: the certificate's
    serial must be listed under the nickname `stap-server`. Returns the tool's output.

    Raises:
        RuntimeError: the certificate is not in alice's client database afterwards.
    """
    from cryptography import x509

    der = (ssl.PEM_cert_to_DER_cert(cert.decode("ascii"))
           if cert.lstrip().startswith(b"-----BEGIN") else cert)
    serial = x509.load_der_x509_certificate(der).serial_number
    name = f"stap-{uuid.uuid4().hex[:8]}.cert"
    _put(container, HOME, {name: der}, _uid(container))
    _, out = _exec(container, ["sh", "-c", (f'umask 077; mkdir -p "{CLIENT_DB}" && '
                                            f'{AUTHORIZE} "{HOME}/{name}" "{CLIENT_DB}"')],
                   user=USER)
    container.exec_run(["rm", "-f", f"{HOME}/{name}"])
    if serial not in trusted_serials(container):
        raise RuntimeError(f"stap-authorize-cert did not add certificate {serial:#x} to "
                           f"{CLIENT_DB}: {out.strip()}")
    return out


def trusted_serials(container: Any) -> set[int]:
    """Serial numbers of the server certificates in alice's client database."""
    code, out = _exec(container, ["certutil", "-L", "-d", f"sql:{CLIENT_DB}", "-n",
                                  "stap-server"], user=USER)
    if code != 0:
        return set()
    # certutil prints short serials as "Serial Number: 123 (0x7b)" and longer ones (stap's
    # 5-byte serials) as colon hex on the next line.
    serials = {int(m, 16) for m in re.findall(r"Serial Number:.*\(0x([0-9a-fA-F]+)\)", out)}
    serials |= {int(m.replace(":", ""), 16)
                for m in re.findall(r"Serial Number:\s*\n\s*([0-9a-fA-F:]+)", out)}
    return serials


def start_avahi(container: Any, timeout: float = 60) -> None:
    """Start dbus and avahi-daemon in CONTAINER (for `stap --use-server` without an address).

    Raises:
        RuntimeError: avahi-daemon did not come up within TIMEOUT seconds.
    """
    code, out = _exec(container, ["sh", "-c", ("mkdir -p /run/dbus && rm -f /run/dbus/pid && "
                                               "dbus-daemon --system --fork && "
                                               "avahi-daemon --no-chroot --daemonize")])
    if code != 0:
        raise RuntimeError(f"starting avahi in {container.name} failed: {out.strip()}")
    if not wait_until(lambda: container.exec_run(["avahi-daemon", "--check"]).exit_code == 0,
                      timeout, 0.25):
        raise RuntimeError(f"avahi-daemon did not come up in {container.name}")


def client_stap(container: Any, args: list[str], files: Mapping[str, bytes | str] | None = None,
                *, timeout: float = 1800) -> tuple[int, str, dict[str, bytes]]:
    """Run `stap ARGS` as alice in a fresh working directory holding FILES.

    Returns (exit code, stdout+stderr, {name: bytes} of the *.ko / *.ko.sgn files produced);
    exit code 124 when stap did not finish within TIMEOUT seconds.
    """
    work = f"w-{uuid.uuid4().hex[:10]}"
    _put(container, HOME, dict(files or {}), _uid(container), top=work)
    code, output = _exec(container, ["sh", "-c", f'cd "{HOME}/{work}" && exec stap "$@"',
                                     "stap", *args], user=USER, timeout=timeout)
    modules: dict[str, bytes] = {}
    stream, _ = container.get_archive(f"{HOME}/{work}")
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        for info in tar:
            base = info.name.rsplit("/", 1)[-1]
            if info.isfile() and base.endswith((".ko", ".ko.sgn")):
                f = tar.extractfile(info)
                if f is not None:
                    modules[base] = f.read()
    container.exec_run(["rm", "-rf", f"{HOME}/{work}"])
    return code, output, modules
