"""The TLS readiness probe and the certinfo rendering, against a loopback TLS server."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from farm.core.errors import ServerError
from farm.trust.tls import certinfo, probe


def test_certinfo_is_der_serial_bytes_as_lowercase_colon_hex() -> None:
    assert certinfo(0xCC23FD50) == "00:cc:23:fd:50"  # high bit set: DER adds a 00
    assert certinfo(0x7F) == "7f"
    assert certinfo(0x1234) == "12:34"


def _cert(tmp: Path, serial: int) -> ssl.SSLContext:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Systemtap Compile Server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    return ctx


def test_probe_completes_the_handshake_and_sends_the_trust_probe(tmp_path: Path) -> None:
    ctx = _cert(tmp_path, 0xCC23FD50)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            received.append(tls.recv(4))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cert = probe("127.0.0.1", port, timeout=10)
    t.join(10)
    listener.close()
    assert certinfo(cert.get_serial_number()) == "00:cc:23:fd:50"
    assert received == [b"\0\0\0\0"]


def test_probe_of_a_closed_port_is_a_server_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ServerError, match="cannot connect"):
        probe("127.0.0.1", port, timeout=2)


def test_probe_of_a_silent_server_times_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(ServerError, match="timed out"):
            probe("127.0.0.1", listener.getsockname()[1], timeout=1)
    finally:
        listener.close()
