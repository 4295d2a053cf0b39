"""The Debian 13 client image end-to-end tests drive the farm with: stap 5.1, run by alice."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.support.client import (
    CLIENT_DB,
    authorize_cert,
    client_stap,
    ensure_client_image,
    network_gateway,
    start_avahi,
    start_client,
    trusted_serials,
)

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def client(docker_client: Any, test_network: Any, test_label: str) -> Any:
    container = start_client(docker_client, test_network, test_label, {"farmhost": "gateway"})
    yield container
    container.remove(force=True)


def _self_signed(cn: str, serial: int) -> tuple[bytes, bytes]:
    from OpenSSL import crypto

    key = crypto.PKey()
    key.generate_key(crypto.TYPE_RSA, 2048)
    cert = crypto.X509()
    cert.get_subject().CN = cn
    cert.set_serial_number(serial)
    cert.gmtime_adj_notBefore(0)
    cert.gmtime_adj_notAfter(3600)
    cert.set_issuer(cert.get_subject())
    cert.set_pubkey(key)
    cert.sign(key, "sha256")
    return (crypto.dump_certificate(crypto.FILETYPE_PEM, cert),
            crypto.dump_certificate(crypto.FILETYPE_ASN1, cert))


def test_client_runs_stap_5_1(client: Any) -> None:
    rc, output, modules = client_stap(client, ["--version"])
    assert rc == 0, output
    assert re.search(r"Systemtap translator/driver \(version 5\.1[/ ]", output), output
    assert modules == {}


def test_alice_is_not_root(client: Any) -> None:
    code, out = client.exec_run(["id", "-u"], user="alice")
    assert code == 0 and out.decode().strip() not in ("", "0")
    code, out = client.exec_run(["stat", "-c", "%U", "/home/alice/.systemtap"])
    assert out.decode().strip() == "alice"


def test_farm_host_name_resolves_to_the_gateway(client: Any, docker_client: Any,
                                                test_network: Any) -> None:
    code, out = client.exec_run(["getent", "hosts", "farmhost"])
    assert code == 0
    assert out.decode().split()[0] == network_gateway(docker_client, test_network)


def test_authorize_cert_trusts_servers_for_alice(client: Any) -> None:
    """Two servers' certificates, PEM and DER, both trusted (stap-gen-cert's subject)."""
    pem, _ = _self_signed("stap-server", 0x5EA1)
    _, der = _self_signed("stap-server", 0xCC23FD5001)  # 5 bytes, like stap-gen-cert
    authorize_cert(client, pem)
    authorize_cert(client, der)
    assert {0x5EA1, 0xCC23FD5001} <= trusted_serials(client)
    _, out = client.exec_run(["certutil", "-L", "-d", f"sql:{CLIENT_DB}"], user="alice",
                                environment={"HOME": "/home/alice"})
    line = next(ln for ln in out.decode().splitlines() if ln.startswith("stap-server"))
    assert line.split()[-1].startswith("P"), out.decode()  # a trusted peer


def test_authorize_cert_refuses_what_is_no_certificate(client: Any) -> None:
    with pytest.raises(ValueError):
        authorize_cert(client, b"not a certificate")


def test_avahi_comes_up(client: Any) -> None:
    start_avahi(client)
    code, out = client.exec_run(["avahi-browse", "-atp", "-k"])
    assert code == 0, out.decode()


def test_client_image_is_built_once(docker_client: Any) -> None:
    first = docker_client.images.get(ensure_client_image(docker_client)).id
    assert docker_client.images.get(ensure_client_image(docker_client)).id == first
