"""Talk TLS to a compile server the way the stap client does (pyOpenSSL)."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

from OpenSSL import SSL, crypto

from farm.core.errors import ServerError


def certinfo(serial: int) -> str:
    """Lowercase colon hex of the DER encoding of SERIAL, as stap's `certinfo` TXT record."""
    data = serial.to_bytes((serial.bit_length() + 8) // 8, "big")
    return ":".join(f"{b:02x}" for b in data)


def probe(host: str, port: int, timeout: float = 5.0) -> crypto.X509:
    """Complete a TLS handshake with HOST:PORT, send the zero-length trust probe, return the
    server's certificate.

    Raises:
        ServerError: no connection, or no handshake within TIMEOUT.
    """
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ServerError(f"cannot connect to {host}:{port}: {e}") from e
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *_: True)
    # A socket with a timeout turns pyOpenSSL's blocking calls into WantRead/WantWrite errors;
    # drive the handshake non-blocking with our own deadline.
    sock.setblocking(False)
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    try:
        _drive(conn, sock, deadline, conn.do_handshake)
        cert = conn.get_peer_certificate()
        if cert is None:
            raise ServerError(f"{host}:{port} sent no certificate")
        _drive(conn, sock, deadline, lambda: conn.sendall(b"\0\0\0\0"))
        return cert
    except SSL.Error as e:
        raise ServerError(f"TLS handshake with {host}:{port} failed: {e}") from e
    finally:
        try:
            conn.shutdown()
        except SSL.Error:
            pass
        sock.close()


def wait_answering(host: str, port: int, timeout: float,
                   alive: Callable[[], bool] = lambda: True) -> str:
    """Wait until HOST:PORT completes a TLS handshake: "" then, else why not (the last probe
    error) once TIMEOUT passed or ALIVE() says the process behind the port is gone."""
    deadline = time.monotonic() + timeout
    last = "not tried"
    while time.monotonic() < deadline and alive():
        try:
            probe(host, port, timeout=3.0)
            return ""
        except ServerError as e:
            last = str(e)
        time.sleep(0.25)
    return last


def _drive(conn: SSL.Connection, sock: socket.socket, deadline: float, step: object) -> None:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerError("TLS handshake timed out")
        try:
            step()  # type: ignore[operator]
            return
        except SSL.WantReadError:
            select.select([sock], [], [], left)
        except SSL.WantWriteError:
            select.select([], [sock], [], left)
        except SSL.ZeroReturnError as e:
            raise ServerError("server closed the connection during the handshake") from e
        except SSL.SysCallError as e:
            raise ServerError(f"connection broken during the handshake: {e}") from e
