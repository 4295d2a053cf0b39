"""The front door's side of the broker's Unix socket (farm/endpoint/broker.py): the
`Directory` and `Provisioner` the endpoint uses in production. No Docker here."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from farm.core.errors import FarmError
from farm.endpoint.routing import Target, Upstream

MAX_MESSAGE = 1 << 20  # as the broker's
TABLE_TIMEOUT = 20.0  # seconds for a table or a check
PROVISION_TIMEOUT = 1200.0  # seconds for a provisioning (a tree download and a start)


def call(path: str, message: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the broker at the Unix socket PATH.

    Raises:
        FarmError: the broker cannot be reached, timed out, or answered garbage.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(message).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_MESSAGE:
                    raise FarmError("the broker's answer is too long")
    except OSError as e:
        raise FarmError(f"the endpoint's broker does not answer ({e})") from e
    try:
        answer = json.loads(buf)
    except ValueError as e:
        raise FarmError("the endpoint's broker answered garbage") from e
    if not isinstance(answer, dict):
        raise FarmError("the endpoint's broker answered garbage")
    return answer


@dataclass
class BrokerDirectory:
    """The Directory and Provisioner of a front door whose broker listens on PATH."""

    path: str

    def hello(self) -> str:
        """The servers' systemtap version (for answers the front door writes itself).

        Raises:
            FarmError: no broker.
        """
        answer = call(self.path, {"op": "hello"}, TABLE_TIMEOUT)
        return str(answer.get("version") or "5.0")

    def upstreams(self, used: frozenset[str] = frozenset(), fresh: bool = False
                  ) -> list[Upstream]:
        answer = call(self.path, {"op": "upstreams", "used": sorted(used), "fresh": fresh},
                      TABLE_TIMEOUT)
        if not answer.get("ok"):
            raise FarmError(f"the broker: {answer.get('error', '?')}")
        out = []
        for d in answer.get("upstreams") or []:
            try:
                out.append(Upstream.from_json(d))
            except (ValueError, KeyError, TypeError) as e:
                raise FarmError(f"the broker sent a malformed server entry ({e})") from e
        return out

    def still_current(self, upstream: Upstream) -> bool:
        answer = call(self.path, {"op": "still_current", "handle": upstream.handle},
                      TABLE_TIMEOUT)
        return bool(answer.get("ok") and answer.get("current"))

    def provision(self, target: Target, say: Callable[[str], None]) -> None:
        answer = call(self.path, {"op": "provision", "release": target.release,
                                  "arch": target.arch}, PROVISION_TIMEOUT)
        if not answer.get("ok"):
            raise FarmError(str(answer.get("error") or "provisioning failed"))
        say("the broker started a server")
