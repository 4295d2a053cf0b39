"""The endpoint's side towards the farm's servers: one request over TLS, the whole answer back.

Each server presents its own certificate, which the endpoint pins (the broker reads it from
the server's certificate database); the farm's own key never leaves the endpoint.
"""

from __future__ import annotations

import socket
import ssl
import struct

from farm.core.errors import FarmError

CONNECT_TIMEOUT = 30.0


class Unreachable(FarmError):
    """Nothing listens where the routing table says a server is (nothing was sent)."""


class TooLarge(FarmError):
    """The server's answer exceeded the endpoint's response cap."""


def forward(host: str, port: int, data: bytes, pinned: bytes, timeout: float,
            max_response: int) -> bytes:
    """Send one request to a server and return its whole response (read until close).

    The server must present the certificate PINNED (DER; b"" skips the check: unit tests).

    Raises:
        Unreachable: no connection or no TLS handshake (the request was not sent).
        TooLarge: the response exceeded MAX_RESPONSE bytes.
        FarmError: pinning, I/O or timeout problems after connecting.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned below: each server's self-signed certificate
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise Unreachable(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
    try:
        with raw:
            raw.settimeout(timeout)
            try:
                tls = ctx.wrap_socket(raw)
            except (OSError, ssl.SSLError) as e:  # e.g. docker-proxy resets: no server behind
                raise Unreachable(f"no TLS handshake with {host}:{port}: {e}") from e
            with tls:
                peer = tls.getpeercert(binary_form=True) or b""
                if pinned and peer != pinned:
                    raise FarmError(f"{host}:{port} presents another certificate than the "
                                    "one the farm pinned for it")
                tls.sendall(struct.pack(">i", len(data)) + data)
                return _read_all(tls, max_response)
    except FarmError:
        raise
    except TimeoutError as e:
        raise FarmError(f"{host}:{port} did not answer within {timeout:.0f} s") from e
    except (OSError, ssl.SSLError) as e:
        raise FarmError(f"cannot talk to {host}:{port}: {e}") from e


def _read_all(tls: ssl.SSLSocket, limit: int) -> bytes:
    """Everything until the peer closes, at most LIMIT bytes.

    Raises:
        TooLarge: more than LIMIT bytes arrived.
    """
    buf = bytearray()
    while True:
        try:
            chunk = tls.recv(1 << 20)
        except ssl.SSLEOFError:  # stap-serverd may close without close_notify
            break
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise TooLarge(f"the server's answer exceeds {limit} bytes (ENDPOINT_MAX_RESPONSE)")
    return bytes(buf)
