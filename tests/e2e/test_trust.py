"""Issue: certificates and trust that just work, with the Debian 13 stap 5.1 client.

One native x86_64 server; a client container that knows this host by its name (and by a
second name the certificate does not carry, as the control for the domain check).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from farm.core import labels
from farm.core.arch import ARM64, X86_64
from farm.trust import tls as tlsprobe
from tests.support.client import (
    HOME,
    _exec,
    client_stap,
    default_host_names,
    start_client,
    trusted_serials,
)
from tests.support.elf import elf_machine
from tests.support.farm import Farm, make_farm
from tests.support.trees import KernelTrees

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HELLO = 'probe begin { println("hello"); exit() }'
MISMATCH = "does not match the DNS name(s) on the server certificate"
OTHER_NAME = "not-the-farm-name"


@pytest.fixture(scope="module")
def farm(docker_client: Any, kernel_trees: KernelTrees, farm_environ: dict[str, str],
         session_dir: Path, test_network: Any, test_label: str) -> Any:
    kernel_trees.tree(X86_64, X86_64)
    host = default_host_names()[0]
    client = start_client(docker_client, test_network, test_label)
    f = make_farm(session_dir / "trust", farm_environ, client, host,
                  {"x86_64": kernel_trees.release(X86_64), "arm64": kernel_trees.release(ARM64)})
    rc, out, err = f.run("start", "-a", "x86_64", "-r", f.releases["x86_64"], "-n", "t")
    assert rc == 0, out + err
    yield f
    f.run("stop")


def _copy_dir(container: Any, src: Path, dest_parent: str, uid: int) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(src.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=f"{src.name}/{path.relative_to(src)}")
            info.uid = info.gid = uid
            with open(path, "rb") as f:
                tar.addfile(info, f)
    assert container.put_archive(dest_parent, buf.getvalue())


def _alice_uid(container: Any) -> int:
    return int(container.exec_run(["id", "-u", "alice"]).output.decode())


def test_certificate_database_is_private_and_names_the_host(farm: Farm) -> None:
    db = farm.root / "state/home/stap-server/.systemtap/ssl/server"
    assert db.stat().st_mode & 0o777 == 0o700
    for key_file in ("key4.db", "cert9.db"):
        assert (db / key_file).stat().st_mode & 0o077 == 0
    cert = x509.load_der_x509_certificate(farm.cert())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    assert dns[0] == farm.host and f"{farm.host}.local" in dns
    assert cert.subject.rfc4514_string() == "CN=Systemtap Compile Server,OU=Systemtap"


def test_exported_instructions_make_the_client_trust_the_farm(farm: Farm,
                                                              session_dir: Path) -> None:
    export = session_dir / "trust-export"
    rc, out, err = farm.run("trust", "--export", str(export))
    assert rc == 0, out + err
    serial = x509.load_der_x509_certificate(farm.cert()).serial_number
    assert f"certinfo {tlsprobe.certinfo(serial)}" in out
    assert (export / "trust-farm.sh").exists() and list(export.glob("*.cert"))
    _copy_dir(farm.client, export, HOME, _alice_uid(farm.client))
    code, output = _exec(farm.client, ["sh", f"{HOME}/{export.name}/trust-farm.sh"], user="alice")
    assert code == 0, output
    assert serial in trusted_serials(farm.client)
    # idempotent
    code, output = _exec(farm.client, ["sh", f"{HOME}/{export.name}/trust-farm.sh"], user="alice")
    assert code == 0, output
    assert trusted_serials(farm.client) == {serial}


def test_connecting_by_host_name_has_no_domain_warning(farm: Farm, docker_client: Any,
                                                      test_label: str,
                                                      test_prefix: str) -> None:
    rc, out, modules = farm.stap(farm.server("t"), ["-m", "hello", "-e", HELLO])
    assert rc == 0, out
    assert MISMATCH not in out
    assert elf_machine(modules["hello.ko"]) == X86_64.elf_machine
    # Control: the client checks the name it gets back for the server's address
    # (getnameinfo), so give this host a second address, on a second network, whose only
    # name is one the certificate does not carry; the same client must then warn.
    net = docker_client.networks.create(f"{test_prefix}-trust2", driver="bridge",
                                        labels={labels.TEST: test_label})
    net.connect(farm.client)
    net.reload()
    gateway = net.attrs["IPAM"]["Config"][0]["Gateway"]
    code, out = _exec(farm.client, ["sh", "-c", f"echo '{gateway} {OTHER_NAME}' >> /etc/hosts"])
    assert code == 0, out
    try:
        rc, out, _ = farm.stap(farm.server("t"), ["-m", "hello", "-e", HELLO], host=OTHER_NAME)
        assert MISMATCH in out, out
    finally:
        net.disconnect(farm.client)


def test_unprivileged_request_gets_a_signature_that_verifies(farm: Farm) -> None:
    rc, out, modules = farm.stap(farm.server("t"), ["--privilege=stapusr", "-e", HELLO])
    assert rc == 0, out
    ko = next(name for name in modules if name.endswith(".ko"))
    sig = modules[f"{ko}.sgn"]
    key = x509.load_der_x509_certificate(farm.cert()).public_key()
    key.verify(sig, modules[ko], padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]
    with pytest.raises(InvalidSignature):
        key.verify(sig, modules[ko] + b"x", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]


def test_serial_survives_restart_and_recreation(farm: Farm, docker_client: Any) -> None:
    before = farm.server("t")
    serial = tlsprobe.probe("127.0.0.1", before["port"]).get_serial_number()
    rc, out, err = farm.run("restart", "-n", "t")
    assert rc == 0, out + err
    after = farm.server("t")
    assert tlsprobe.probe("127.0.0.1", after["port"]).get_serial_number() == serial
    docker_client.containers.get(after["container"]).remove(force=True)
    rc, out, err = farm.run("start", "-a", "x86_64", "-r", farm.releases["x86_64"], "-n", "t")
    assert rc == 0, out + err
    again = farm.server("t")
    assert again["container"] != after["container"]
    assert tlsprobe.probe("127.0.0.1", again["port"]).get_serial_number() == serial


def test_revoke_makes_the_next_connection_fail(farm: Farm, session_dir: Path) -> None:
    export = session_dir / "trust-export"
    code, output = _exec(farm.client, ["sh", f"{HOME}/{export.name}/trust-farm.sh", "--revoke"],
                         user="alice")
    assert code == 0, output
    assert trusted_serials(farm.client) == set()
    rc, out, _ = client_stap(farm.client, [f"--use-server={farm.host}:{farm.server('t')['port']}",
                                           "-r", farm.releases["x86_64"], "-p4", "-e", HELLO])
    assert rc != 0
    assert "Unable to connect to a server" in out or "not trusted" in out.lower() \
        or "SEC_ERROR" in out, out


def test_host_side_trust_and_revoke_in_the_invoking_users_database(farm: Farm,
                                                                   tmp_path: Path) -> None:
    env = dict(farm.env, HOME=str(tmp_path))
    farm_env, farm.env = farm.env, env
    try:
        rc, out, err = farm.run("trust")
        assert rc == 0, out + err
        assert "trusted" in out
        db = tmp_path / ".systemtap/ssl/client"
        assert (db / "cert9.db").exists()
        rc, out, err = farm.run("trust", "--revoke")
        assert rc == 0, out + err
        assert "revoked" in out
    finally:
        farm.env = farm_env
