"""The endpoint's containers on the engine: the farm's identity, the broker and the front
door (what each is and may do: farm/endpoint/service.py), started, stopped and reported.

    ensure_endpoint(engine, gcfg, environ, provision=True, config_files=[])
    stop_endpoint(engine)
    endpoint_state(engine, gcfg)      # one line for `status`
"""

from __future__ import annotations

import os
import pwd
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from farm.core import labels
from farm.core.errors import ServerError
from farm.core.spec import GlobalConfig
from farm.engine import images
from farm.engine.docker import Engine, still_running
from farm.engine.servers import DockerBackend
from farm.engine.service_specs import (
    BROKER_KIND,
    Ids,
    broker_name,
    broker_spec,
    cache_volume,
    frontdoor_name,
    frontdoor_spec,
    identity_dir,
    run_volume,
)
from farm.trust import tls

Say = Callable[[str], None]


def endpoint_ids(gcfg: GlobalConfig) -> Ids:
    """ENDPOINT_USER's uid and gid on this host.

    Raises:
        ServerError: it does not exist or is root.
    """
    try:
        pw = pwd.getpwnam(gcfg.endpoint_user)
    except KeyError as e:
        raise ServerError(f"the endpoint's user '{gcfg.endpoint_user}' does not exist on "
                          "this host", hint="`make setup` creates stap-endpoint; or set "
                                            "ENDPOINT_USER") from e
    if pw.pw_uid == 0:
        raise ServerError("the endpoint's front door never runs as root",
                          hint="set ENDPOINT_USER to an unprivileged user")
    return Ids(pw.pw_uid, pw.pw_gid)


def ensure_identity(backend: DockerBackend, gcfg: GlobalConfig, ids: Ids) -> str:
    """The farm's identity database (made once by stap-gen-cert, owned by IDS); its path.

    Raises:
        ServerError: it cannot be made, or it is unsafe.
    """
    db = identity_dir(gcfg)
    parent = os.path.dirname(db)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(parent, ids.uid, ids.gid)
    backend.ensure_cert_db(db, ids.uid, ids.gid)
    return db


def ensure_endpoint(engine: Engine, gcfg: GlobalConfig, *, provision: bool,
                    config_files: Sequence[str], default_file: str,
                    say: Say = lambda s: None) -> Any:
    """Start the farm's endpoint (identity, broker, front door; idempotent) and wait until it
    answers TLS. Returns the front door's container.

    Raises:
        ServerError: no endpoint user, Docker refused, or it did not come up.
    """
    ids = endpoint_ids(gcfg)
    ensure_identity(DockerBackend.of(engine, gcfg), gcfg, ids)
    image = images.ensure_service_image(engine, gcfg, say)
    engine.ensure_volume(cache_volume(engine.prefix), "modcache")
    engine.ensure_volume(run_volume(engine.prefix), "endpoint-run")
    tag, image_id = images.service_tag(gcfg), str(image.id)
    broker = engine.ensure(broker_spec(tag, image_id, gcfg, ids, provision=provision,
                                       config_files=config_files, default_file=default_file),
                           "the endpoint's broker")
    front = engine.ensure(frontdoor_spec(tag, image_id, gcfg, ids, provision=provision,
                                         config_files=config_files, default_file=default_file),
                          "the endpoint's front door")
    last = tls.wait_answering(gcfg.probe_address, gcfg.endpoint_port, 90,
                              lambda: still_running(front) and still_running(broker))
    if not last:
        return front
    logs = "\n".join(f"--- {c.name}:\n{engine.logs(c)}" for c in (broker, front))
    for c in (front, broker):
        engine.remove(c)
    raise ServerError(f"the endpoint did not answer TLS on port {gcfg.endpoint_port} ({last})"
                      f"\n{logs}")


def stop_endpoint(engine: Engine) -> tuple[bool, int]:
    """Stop and remove the farm's endpoint (its cache and identity stay) and the servers it
    provisioned (nothing else would retire them): (whether an endpoint ran, servers removed)."""
    found = False
    for name in (frontdoor_name(engine.prefix), broker_name(engine.prefix)):
        c = engine.container(name)
        if c is not None:
            found = True
            engine.remove(c)
    provisioned = engine.containers("server", having=[labels.PROVISIONED])
    for c in provisioned:
        engine.remove(c)
    return found, len(provisioned)


def metrics(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> dict[str, float]:
    """The endpoint's metrics as {name: value} (samples summed over labels by name)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def endpoint_state(engine: Engine, gcfg: GlobalConfig) -> str:
    """One line for `status`: the endpoint, its port and its cache ("" when there is none)."""
    found = engine.containers("endpoint")
    if not found:
        return ""
    c = found[0]
    port = c.labels.get(labels.PORT, "?")
    if c.status != "running":
        return f"farm endpoint: {c.status} ({c.name}, port {port})"
    brokers = engine.containers(BROKER_KIND)
    if brokers and brokers[0].status != "running":
        return (f"farm endpoint: broker {brokers[0].status} ({brokers[0].name}; port {port} "
                "answers nothing but errors)")
    mport = int(c.labels.get(f"{labels.PREFIX}.metrics-port", "0") or 0)
    cache = ""
    if mport:
        try:
            m = metrics(mport, gcfg.probe_address if gcfg.endpoint_metrics_address in (
                "0.0.0.0", "::") else gcfg.endpoint_metrics_address)
            cache = (f"; cache {int(m.get('stapfarm_endpoint_cache_hits_total', 0))} hits, "
                     f"{int(m.get('stapfarm_endpoint_cache_misses_total', 0))} misses, "
                     f"{m.get('stapfarm_endpoint_cache_bytes', 0) / 2**20:.1f} MiB in "
                     f"{int(m.get('stapfarm_endpoint_cache_entries', 0))} modules")
        except (OSError, ValueError) as e:
            cache = f"; metrics unavailable ({e})"
    return f"farm endpoint: running on port {port} ({c.name}{cache})"
