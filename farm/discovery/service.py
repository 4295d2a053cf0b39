"""The advertiser's container: one per farm, on the host network, started with the first
server (farm/discovery/advertiser.py is what runs in it).

    ensure_advertiser(engine, gcfg)   # idempotent; called by `stap-server start`
    advertiser_state(engine)          # one line for `status`
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from farm.core.spec import GlobalConfig
from farm.discovery import mdns
from farm.discovery.publisher import host_interfaces
from farm.engine import images
from farm.engine.docker import Engine
from farm.engine.service_specs import DOCKER_SOCKET, advertiser_name, advertiser_spec

Say = Callable[[str], None]


def _foreign(engine: Engine) -> Any:
    """A running advertiser of the farm that its CLI did not create (compose, Swarm)."""
    for c in engine.containers("advertiser", running=True):
        if c.name != advertiser_name(engine.prefix):
            return c
    return None


def ensure_advertiser(engine: Engine, gcfg: GlobalConfig, *, say: Say = lambda s: None,
                      docker_socket: str = DOCKER_SOCKET) -> Any:
    """Make sure the farm's advertiser runs with GCFG's interfaces; return its container
    (None when MDNS_INTERFACES=none, which also retires a running advertiser).

    Raises:
        ConfigError: MDNS_INTERFACES names no interface or address of this host.
        ImageError: its image could not be built.
        ServerError: Docker refused to run it.
    """
    foreign = _foreign(engine)
    if foreign is not None:  # compose's or a stack's advertiser already follows the farm
        return foreign
    current = engine.container(advertiser_name(engine.prefix))
    if mdns.disabled(gcfg.mdns_interfaces):
        if current is not None:
            engine.remove(current, timeout=5)  # stopped first: it sends its goodbyes
        return None
    mdns.choose_addresses(gcfg.mdns_interfaces, host_interfaces())  # fail here, not looping
    image = images.ensure_service_image(engine, gcfg, say)
    spec = advertiser_spec(images.service_tag(gcfg), str(image.id), engine.prefix,
                           gcfg.mdns_interfaces, gcfg.probe_address,
                           engine.test_label, docker_socket)
    return engine.ensure(spec, "the mDNS advertiser", stop_timeout=5)


def advertiser_state(engine: Engine) -> str:
    """One line for `status`: whether the farm's advertiser runs, and where it advertises."""
    c = engine.container(advertiser_name(engine.prefix)) or _foreign(engine)
    if c is None:
        return "mDNS advertiser: not running"
    cmd = list(c.attrs.get("Config", {}).get("Cmd") or [])
    where = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "--interface"]
    on = ", ".join(where) if where else "every LAN interface"
    if c.status == "running":
        return f"mDNS advertiser: running ({c.name}, on {on})"
    state = c.attrs.get("State", {})
    code = state.get("ExitCode")
    detail = f", exit code {code}" if c.status == "exited" and code is not None else ""
    return f"mDNS advertiser: {c.status} ({c.name}{detail})"
