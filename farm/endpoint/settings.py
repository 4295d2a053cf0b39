"""The endpoint's settings: its address, its identity's files and every bound it keeps.

A frozen value (the global file's ENDPOINT_* variables, docs/cli.md; farm/endpoint/service.py
builds it) read by the connection side (farm/endpoint/server.py) and the answering side
(farm/endpoint/router.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from farm.endpoint.policy import Policy


@dataclass(frozen=True)
class Settings:
    """Where the endpoint listens, the farm's certificate and key, and its bounds."""

    listen: str = "0.0.0.0"
    port: int = 5100
    cert_file: str = ""  # PEM certificate (the farm's)
    key_file: str = ""  # PEM private key (the farm's)
    max_compressed: int = 16 * 1024 * 1024
    max_uncompressed: int = 64 * 1024 * 1024
    handshake_timeout: float = 10.0
    idle_timeout: float = 30.0  # the longest silence while reading a request
    request_timeout: float = 120.0  # the whole request must arrive within this
    write_timeout: float = 60.0  # the whole answer must be taken by the client within this
    queue_timeout: float = 900.0  # the longest wait for a build slot (or for memory)
    forward_timeout: float = 1800.0  # one compile (an emulated tracepoint takes minutes)
    max_connections: int = 256
    max_per_source: int = 32
    max_queue: int = 256  # requests waiting for a build slot
    memory: int = 512 * 1024 * 1024  # request bytes held at once
    max_response: int = 256 * 1024 * 1024  # on the wire and unpacked (ENDPOINT_MAX_RESPONSE)
    server_version: str = "5.6"  # for responses the endpoint writes itself
    workers: int = 64  # threads that forward and wait for builds
    policy: Policy = field(default_factory=Policy)

    @property
    def connection_timeout(self) -> float:
        """The whole connection: read, queue, provisioning or build, write."""
        return (self.handshake_timeout + self.request_timeout + self.queue_timeout
                + self.forward_timeout + self.write_timeout)
