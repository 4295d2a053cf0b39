"""The contract between the command line (pure planning) and whatever runs servers (Docker)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from farm.core.spec import ServerConfig


@dataclass(frozen=True)
class RunningServer:
    """A server the backend observed (from Docker labels, never from memory)."""

    config: ServerConfig
    pid: int  # the daemon's PID on the host; 0 when it is not running
    port: int  # the published host port; 0 when unknown
    container: str  # backend handle (container id)
    running: bool  # False: it exists but its daemon is gone (crashed, engine restart...)
    # True while its container runs (or restarts) without the daemon up yet, e.g. the restart
    # policy bringing back a killed daemon: not stale, so `status` does not remove it.
    settling: bool = False
    certinfo: str = ""  # certificate serial as lowercase colon hex, when known
    # why a running server cannot serve (e.g. a kernel tree removed under it), for `status`
    problems: tuple[str, ...] = ()

    @property
    def nickname(self) -> str:
        """The configured nickname, else the PID (as upstream)."""
        return self.config.nickname or str(self.pid)


class Backend(Protocol):
    """Runs servers. Every method may raise a `farm.core.errors.FarmError` subclass."""

    def list_servers(self) -> list[RunningServer]:
        """Every server the farm manages, running or stale."""
        ...

    def start(self, config: ServerConfig) -> RunningServer:
        """Start CONFIG and return once it answers TLS; raise ServerError (with log tail)."""
        ...

    def stop(self, server: RunningServer) -> None:
        """Stop SERVER and remove its container (certificates and log stay)."""
        ...

    def notices(self) -> list[str]:
        """Lines `status` adds after the servers (advertiser state, certificate expiry)."""
        ...
