"""A python-zeroconf browser of `_stap._tcp` bound to one address (a test-created bridge's
gateway): mDNS in tests never leaves on an interface the test did not create.

    b = Browser(gateway)
    svc = b.wait_for_port(port, timeout=60)   # {"name", "port", "txt": {key: value}} or None
    b.events                                   # [(monotonic time, "Added"/"Removed"/..., name)]
    b.ports()                                  # {name: port} of what resolves now
    b.close()
"""

from __future__ import annotations

import threading
import time
from typing import Any

from farm.discovery.mdns import SERVICE_TYPE
from tests.support.poll import wait_until


class Browser:
    def __init__(self, address: str) -> None:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf

        self.address = address
        self.zc = Zeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
        self.names: set[str] = set()
        self.events: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self.browser = ServiceBrowser(self.zc, SERVICE_TYPE, handlers=[self._on_change])

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        with self._lock:
            self.events.append((time.monotonic(), state_change.name, name))
            if state_change is ServiceStateChange.Removed:
                self.names.discard(name)
            else:
                self.names.add(name)

    def current(self) -> set[str]:
        with self._lock:
            return set(self.names)

    def saw(self, kind: str, name: str) -> bool:
        """Whether an event KIND ("Added", "Removed", "Updated") for NAME was seen."""
        with self._lock:
            return any(k == kind and n == name for _, k, n in self.events)

    def info(self, name: str, timeout_ms: int = 3000) -> Any:
        """python-zeroconf's ServiceInfo of NAME, or None when it does not resolve."""
        return self.zc.get_service_info(SERVICE_TYPE, name, timeout=timeout_ms)

    def ports(self) -> dict[str, int]:
        """{name: port} of every browsed service that resolves now."""
        found = {}
        for name in self.current():
            info = self.info(name, timeout_ms=2000)
            if info is not None:
                found[name] = int(info.port or 0)
        return found

    def resolve(self, name: str, timeout_ms: int = 3000) -> dict[str, Any] | None:
        """NAME's port and TXT (decoded), or None when it does not resolve."""
        info = self.info(name, timeout_ms)
        if info is None:
            return None
        txt = {k.decode(): (v or b"").decode() for k, v in (info.properties or {}).items()}
        return {"name": name, "port": int(info.port or 0), "txt": txt}

    def with_port(self, port: int) -> dict[str, Any] | None:
        """The browsed service on PORT, resolved now, or None."""
        for name in sorted(self.current()):
            got = self.resolve(name)
            if got is not None and got["port"] == port:
                return got
        return None

    def wait_for_port(self, port: int, timeout: float) -> dict[str, Any] | None:
        return wait_until(lambda: self.with_port(port), timeout)

    def close(self) -> None:
        self.browser.cancel()
        self.zc.close()
