"""A raw wire-protocol peer for tests (stap-protocol.md §3): TLS without verification to a
port on this host, bytes in, the whole answer out (read until the server closes).

    with tls(port) as s: ...                 # an open TLS connection (e.g. to leave idle)
    exchange(port, struct.pack(">i", n) + request_zip)   # -> the response bytes
"""

from __future__ import annotations

import socket
import ssl


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the tests pin nothing: they look at what comes back
    return ctx


def tls(port: int, timeout: float = 30) -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:PORT, handshake done."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return client_context().wrap_socket(raw)


def exchange(port: int, payload: bytes, timeout: float = 30) -> bytes:
    """Send PAYLOAD and return everything the server sends until it closes."""
    with tls(port, timeout) as s:
        s.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ssl.SSLEOFError:  # a close without close_notify ends the answer too
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)
