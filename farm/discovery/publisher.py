"""Publishing mDNS services with python-zeroconf: the one place the farm opens mDNS sockets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from farm.discovery.mdns import SERVICE_TYPE, Changes, Service, ServiceKey

log = logging.getLogger("farm.discovery.advertiser")
OP_TIMEOUT = 10.0  # seconds for one batch of zeroconf operations


def host_interfaces() -> dict[str, list[str]]:
    """This host's interfaces and their IPv4 addresses (what zeroconf itself enumerates)."""
    import ifaddr

    out: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        out[str(adapter.nice_name)] = [str(ip.ip) for ip in adapter.ips
                                       if isinstance(ip.ip, str)]
    return out


class ZeroconfPublisher:
    """Registers, updates and withdraws `_stap._tcp` services on the given IPv4 addresses.

    Nothing is opened before open(); close() sends goodbyes for everything still published.
    """

    def __init__(self, addresses: Iterable[str],
                 factory: Callable[[list[str]], Any] | None = None) -> None:
        self.addresses = list(addresses)
        self._factory = factory
        self._zc: Any = None
        self._browser: Any = None
        self._infos: dict[ServiceKey, Any] = {}
        self._live: set[int] = set()  # ids of the infos zeroconf has registered
        self._seen: set[str] = set()  # instance names browsed on the network (lowercase)
        self._lock = threading.Lock()

    def open(self) -> None:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf

        if self._factory is not None:
            self._zc = self._factory(self.addresses)
        else:
            self._zc = Zeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])

    def _on_change(self, zeroconf: Any, service_type: str, name: str,
                   state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        instance = name[:-len(SERVICE_TYPE) - 1] if name.endswith(SERVICE_TYPE) else name
        with self._lock:
            if state_change is ServiceStateChange.Removed:
                self._seen.discard(instance.lower())
            else:
                self._seen.add(instance.lower())

    def others(self) -> set[str]:
        """Instance names of `_stap._tcp` services on the network that are not ours."""
        with self._lock:
            seen = set(self._seen)
        ours = {n.lower() for n in self.published().values()}
        return seen - ours

    def actual_name(self, key: ServiceKey) -> str:
        """The instance name zeroconf really published for KEY (after any collision rename)."""
        info = self._infos.get(key)
        return "" if info is None else _instance(info)

    def published(self) -> dict[ServiceKey, str]:
        with self._lock:
            keys = list(self._infos)
        return {k: self.actual_name(k) for k in keys}

    def _info(self, svc: Service, name: str | None = None) -> Any:
        from zeroconf import ServiceInfo

        return ServiceInfo(SERVICE_TYPE, name or svc.fullname, port=svc.port,
                           properties=svc.txt, server=f"{svc.host}.local.",
                           addresses=[socket.inet_aton(a) for a in self.addresses])

    def apply(self, changes: Changes) -> None:
        """Withdraw, update and register as CHANGES says. Registrations still probing after
        OP_TIMEOUT finish in the background; one that fails is dropped from published(), so
        the next apply retries it."""
        if self._zc is None:
            raise RuntimeError("publisher is not open")
        with self._lock:
            removes = [self._infos.pop(s.key) for s in changes.remove if s.key in self._infos]
            updates = []
            for s in changes.update:
                if s.key in self._infos:
                    info = self._info(s, self._infos[s.key].name)
                    self._infos[s.key] = info
                    updates.append(info)
            adds = []
            for s in changes.add:
                info = self._info(s)
                self._infos[s.key] = info  # in flight: published() counts it already
                adds.append((s, info))
        future = asyncio.run_coroutine_threadsafe(self._apply(removes, updates, adds),
                                                  self._zc.loop)
        try:
            future.result(OP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            log.warning("mDNS registration is slow; it goes on in the background")

    async def _apply(self, removes: list[Any], updates: list[Any],
                     adds: list[tuple[Service, Any]]) -> None:
        zc = self._zc
        for info in removes:
            if id(info) in self._live:  # one still probing is withdrawn when it is done
                self._live.discard(id(info))
                await zc.async_unregister_service(info)  # goodbyes go out in the background
                log.info("Avahi service '%s' withdrawn.", _instance(info))
        for info in updates:
            await zc.async_update_service(info)
            self._live.add(id(info))
        # Probing takes ~1 s per name; probe every name at once.
        await asyncio.gather(*(self._register(svc, info) for svc, info in adds))

    async def _register(self, svc: Service, info: Any) -> None:
        zc = self._zc
        try:
            await zc.async_register_service(info, allow_name_change=True)
        except Exception as e:  # noqa: BLE001 - never crash: dropped, retried next time
            log.error("Avahi entry group failure: registering '%s' failed: %s", svc.name, e)
            with self._lock:
                if self._infos.get(svc.key) is info:
                    del self._infos[svc.key]
            return
        with self._lock:
            wanted = self._infos.get(svc.key) is info
        if not wanted:  # withdrawn while it was probing
            await zc.async_unregister_service(info)
            return
        self._live.add(id(info))
        got = _instance(info)
        if got != svc.name:
            log.warning("Avahi service name collision, renaming service '%s' to '%s'",
                        svc.name, got)
        log.info("Avahi service '%s' successfully established.", got)

    def withdraw_all(self) -> None:
        if self._infos:
            self.apply(Changes(remove=tuple(_stub(k) for k in self._infos)))

    def close(self) -> None:
        """Send goodbyes for every service, then close the sockets."""
        if self._zc is None:
            return
        zc, self._zc = self._zc, None
        try:
            if self._browser is not None:
                self._browser.cancel()
            if self._infos:
                zc.unregister_all_services()
                with self._lock:
                    self._infos.clear()
        finally:
            zc.close()


def _instance(info: Any) -> str:
    return str(info.name)[:-len(SERVICE_TYPE) - 1]


def _stub(key: ServiceKey) -> Service:
    return Service(key=key, host="", port=0, strings=())

