"""Removing what a test (or a bench run) created, by its org.stapfarm.test label."""

from __future__ import annotations

from typing import Any

from farm.core import labels


def cleanup_label(client: Any, label: str) -> list[str]:
    """Remove every container, network and volume labelled org.stapfarm.test=LABEL.

    Returns what could not be removed (empty when everything went).
    """
    import docker.errors

    flt = {"label": f"{labels.TEST}={label}"}
    problems: list[str] = []
    for c in client.containers.list(all=True, filters=flt):
        try:
            c.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            problems.append(f"container {c.name}: {e}")
    for n in client.networks.list(filters=flt):
        try:
            n.reload()
            for cid in (n.attrs.get("Containers") or {}):
                n.disconnect(cid, force=True)
            n.remove()
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            problems.append(f"network {n.name}: {e}")
    for v in client.volumes.list(filters=flt):
        try:
            v.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            problems.append(f"volume {v.name}: {e}")
    return problems


def retire_advertiser(client: Any, prefix: str) -> None:
    """Stop (its mDNS goodbyes go out) and remove PREFIX's advertiser container, if any."""
    import docker.errors

    from farm.engine.service_specs import advertiser_name as container_name

    try:
        c = client.containers.get(container_name(prefix))
    except docker.errors.NotFound:
        return
    c.stop(timeout=5)
    c.remove(force=True)
