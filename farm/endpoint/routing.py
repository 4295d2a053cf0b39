"""What the endpoint routes to: targets, upstream servers, and the interfaces behind them.

Pure values. The front door (farm/endpoint/server.py) asks a `Directory` where the servers
are and a `Provisioner` to start one; in production both are the broker
(farm/endpoint/broker_client.py talking to farm/endpoint/broker.py), in unit tests lists.
Upstreams cross the broker's socket as JSON (`to_json` / `from_json`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_RELEASE = 128  # characters of a release string the endpoint routes or provisions
_RELEASE_RE = re.compile(rf"[a-zA-Z0-9_.+-]{{1,{MAX_RELEASE}}}")
_ARCH_RE = re.compile(r"[a-z0-9_]{1,32}")


@dataclass(frozen=True)
class Target:
    """What a request asks for: a kernel release and stap's architecture name."""

    release: str
    arch: str

    def __str__(self) -> str:
        return f"{self.release} {self.arch}"

    @property
    def well_formed(self) -> bool:
        """Whether both words are short and of the characters a release or arch has."""
        return bool(_RELEASE_RE.fullmatch(self.release) and _ARCH_RE.fullmatch(self.arch))


@dataclass
class Upstream:
    """A running farm server the endpoint can forward to."""

    name: str
    host: str
    port: int
    arch: str  # stap name
    releases: tuple[str, ...]
    identity: str  # image, options: what besides the tree decides the result
    tree_ids: dict[str, str]  # release -> kernel tree manifest digest ("" = tree missing)
    slots: int  # requests it may build at once (its worker count)
    pin: bytes = b""  # DER of the certificate it must present (its own, never the farm's)
    handle: str = ""  # the backend's id of this incarnation (container id + image)
    provisioned: bool = False  # started by the endpoint (retired when idle)
    extra: dict[str, str] = field(default_factory=dict)

    def serves(self, target: Target) -> bool:
        return self.arch == target.arch and target.release in self.releases

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "port": self.port, "arch": self.arch,
                "releases": list(self.releases), "identity": self.identity,
                "tree_ids": dict(self.tree_ids), "slots": self.slots,
                "pin": base64.b64encode(self.pin).decode("ascii"), "handle": self.handle,
                "provisioned": self.provisioned}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Upstream:
        """Raises:
            ValueError, KeyError, TypeError: D is not an upstream.
        """
        tree_ids = d["tree_ids"]
        if not isinstance(tree_ids, dict):
            raise TypeError("tree_ids")
        return cls(name=str(d["name"]), host=str(d["host"]), port=int(d["port"]),
                   arch=str(d["arch"]), releases=tuple(str(r) for r in d["releases"]),
                   identity=str(d["identity"]),
                   tree_ids={str(k): str(v) for k, v in tree_ids.items()},
                   slots=max(1, int(d["slots"])),
                   pin=base64.b64decode(str(d.get("pin", "")), validate=True),
                   handle=str(d.get("handle", "")), provisioned=bool(d.get("provisioned")))


class Directory(Protocol):
    """Where the running servers are (the broker in production, a list in unit tests)."""

    def upstreams(self, used: frozenset[str] = frozenset(), fresh: bool = False
                  ) -> list[Upstream]:
        """The servers now; USED names the ones that answered requests since the last call
        (so that idle provisioned servers can be retired). FRESH: the caller found the table
        wrong (a server gone or restarted): look at the engine again rather than answer from
        a table kept for a while (at most once per FRESH_INTERVAL)."""
        ...

    def still_current(self, upstream: Upstream) -> bool:
        """Whether UPSTREAM still runs as listed (same container, same image): checked
        before a cached answer is given on its behalf, so a restart on another image
        between two refreshes cannot serve a stale module."""
        ...


class Provisioner(Protocol):
    """Starts a server for a target nobody serves (kernel tree first)."""

    def provision(self, target: Target, say: Callable[[str], None]) -> None:
        """Raises:
            FarmError: refused or failed; the message is for the client.
        """
        ...
