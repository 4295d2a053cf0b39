"""The lab farm's compose files, generated (`stap-server compose --lab -o .`): its servers are
`server_spec`'s containers for configurations the resolver completes, as `stap-server start`
would run them; the advertiser is `advertiser_spec`'s; the rest (the init jobs, the
endpoint's two containers, volumes, networks) is data here. farm/engine/compose.py
translates; its variables keep every knob of compose.yaml's header overridable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from farm.core import labels
from farm.core.arch import ARM64, X86_64, Arch
from farm.core.spec import GlobalConfig, Strategy
from farm.core.strategy import resolve
from farm.engine import images, service_specs
from farm.engine.compose import IntVar, Reset, StrVar, dump, json_with_vars, script, service
from farm.engine.specs import HOME, LOG, Placement, server_spec
from farm.kernels.trees import volume_name
from farm.manual.compose_text import HEADER, OVERRIDE_HEADER
from farm.manual.config import default_global
from farm.manual.host import Host
from farm.manual.server_config import ServerDraft, resolve_server

SOURCE = "compose.yaml"  # the `source` of the servers' configurations
FILES = ("compose.yaml", "compose.override.yaml")


def _release(name: str) -> StrVar:
    return StrVar(name, required=f"set {name} to a kernel release the farm has a tree for "
                                 "(make up does)")


PREFIX = StrVar("STAPFARM_PREFIX", "stapfarm")
TEST_LABEL = StrVar("STAPFARM_TEST_LABEL")
HOSTNAME = StrVar("STAPFARM_HOSTNAME", "stapfarm")
SERVER_UID = IntVar("STAPFARM_SERVER_UID", images.DEFAULT_SERVER_UID)
SERVER_GID = IntVar("STAPFARM_SERVER_GID", images.DEFAULT_SERVER_UID)
ENDPOINT_UID = IntVar("STAPFARM_ENDPOINT_UID", 156)
ENDPOINT_GID = IntVar("STAPFARM_ENDPOINT_GID", 156)
MEMORY = StrVar("STAPFARM_MEMORY_LIMIT", "2g")
CPUS = StrVar("STAPFARM_CPUS", "2")
CERT_NAMES = StrVar("STAPFARM_CERT_NAMES")
ENDPOINT_PORT = StrVar("STAPFARM_ENDPOINT_PORT", "5100")
METRICS_PORT = StrVar("STAPFARM_ENDPOINT_METRICS_PORT", "9164")
PROVISION = StrVar("STAPFARM_ENDPOINT_PROVISION", "yes")
OFFER = StrVar("STAPFARM_ENDPOINT_OFFER")
DEBIAN_MIRROR = StrVar("STAPFARM_DEBIAN_MIRROR")
APT_ALLOW_EXPIRED = StrVar("STAPFARM_APT_ALLOW_EXPIRED", "no")
BASE_IMAGES = {X86_64: StrVar("STAPFARM_BASE_IMAGE_AMD64", f"debian:{images.SUITE}-slim"),
               ARM64: StrVar("STAPFARM_BASE_IMAGE_ARM64", f"arm64v8/debian:{images.SUITE}-slim")}
KERNELS_VOLUMES = {X86_64: "STAPFARM_KERNELS_VOLUME", ARM64: "STAPFARM_KERNELS_VOLUME_ARM64"}
INIT = {X86_64: "init", ARM64: "init-arm64"}  # the init job of each node architecture
TINI_SH = ["/usr/bin/tini", "--", "/bin/sh", "-c"]
DONE = {"condition": "service_completed_successfully"}


@dataclass(frozen=True)
class Target:
    """One server service: NAME serves ARCH with STRATEGY on NODE (an architecture)."""

    name: str
    nickname: str
    arch: Arch
    strategy: Strategy
    node: Arch
    port: IntVar
    release: StrVar


TARGETS = (
    Target("x86_64", "x86_64", X86_64, Strategy.NATIVE, X86_64,
           IntVar("STAPFARM_X86_64_PORT", 5101), _release("STAPFARM_RELEASE_X86_64")),
    Target("aarch64", "aarch64", ARM64, Strategy.CROSS, X86_64,
           IntVar("STAPFARM_AARCH64_PORT", 5102), _release("STAPFARM_RELEASE_ARM64")),
    # Swarm only: on arm64 nodes the aarch64 server is native, on the cross one's port.
    Target("aarch64-native", "aarch64", ARM64, Strategy.NATIVE, ARM64,
           IntVar("STAPFARM_AARCH64_PORT", 5102), _release("STAPFARM_RELEASE_ARM64")),
)

# The servers' entrypoint: wait for the certificate database the init job creates (compose
# orders them; a Swarm starts both at once), then the image's own entry with `command`.
SERVER_WAIT = script("""\
until [ -s "$HOME/.systemtap/ssl/server/stap.cert" ]; do
  echo "waiting for the certificate database (init service)"; sleep 2
done
exec /bin/sh /usr/local/lib/stapfarm/server-entry.sh "$@"
""")
# The certificate database in the home volume (stap-gen-cert, for the host's names, once;
# an existing one is kept, so clients' trust survives), and the endpoint's identity. Root
# only to hand the fresh volumes to their users, then each step as its user (setpriv).
INIT_SCRIPT = script(f"""\
set -eu
chown "$SERVER_UID:$SERVER_GID" {HOME} /var/log/stapfarm
# The farm's identity (the endpoint's certificate and key) and the module cache belong
# to the endpoint's unprivileged user; no server mounts them.
chown "$ENDPOINT_UID:$ENDPOINT_GID" {service_specs.ENDPOINT_MOUNT} {service_specs.CACHE_MOUNT}
chmod 700 {service_specs.ENDPOINT_MOUNT} {service_specs.CACHE_MOUNT}
HOME={service_specs.ENDPOINT_MOUNT} \\
  setpriv --reuid="$ENDPOINT_UID" --regid="$ENDPOINT_GID" --clear-groups /bin/sh -c '
  set -eu; umask 077
  db={service_specs.IDENTITY_MOUNT}
  if [ -s "$db/stap.cert" ]; then echo "certificate database $db exists"; exit 0; fi
  h=$(hostname)
  # stap-gen-cert removes and re-creates $db itself: its parent must be writable.
  /usr/lib/systemtap/stap-gen-cert "$db" "$h" "$h.local" $CERT_NAMES
  chmod 644 "$db/stap.cert"'
exec setpriv --reuid="$SERVER_UID" --regid="$SERVER_GID" --clear-groups /bin/sh -c '
  set -eu; umask 077
  db="$HOME/.systemtap/ssl/server"
  if [ -s "$db/stap.cert" ]; then echo "certificate database $db exists"; exit 0; fi
  mkdir -p "$HOME/.systemtap/ssl"; chmod 700 "$HOME/.systemtap" "$HOME/.systemtap/ssl"
  h=$(hostname)
  /usr/lib/systemtap/stap-gen-cert "$db" "$h" "$h.local" $CERT_NAMES
  chmod 644 "$db/stap.cert"'
""")
# The advertiser's command (advertiser_spec's) with MDNS_INTERFACES as --interface words.
ADVERTISER_WRAP = script("""\
for i in $MDNS_INTERFACES; do set -- "$@" --interface "$i"; done
exec python3 -m farm.discovery.advertiser "$@"
""")
FRONTDOOR_SCRIPT = script(f"""\
set -eu
until [ -s {service_specs.IDENTITY_MOUNT}/stap.cert ]; do
  echo "waiting for the farm's identity (init service)"; sleep 2
done
printf '%s\\n' "ENDPOINT_PORT=$ENDPOINT_PORT" \\
  "ENDPOINT_METRICS_PORT=$ENDPOINT_METRICS_PORT" \\
  "ENDPOINT_PROVISION=$ENDPOINT_PROVISION" "ENDPOINT_OFFER=$ENDPOINT_OFFER" \\
  "ENDPOINT_CACHE_SIZE=$ENDPOINT_CACHE_SIZE" "MDNS_INTERFACES=none" \\
  > /run/stapfarm/global
exec python3 -m farm endpoint run -c /run/stapfarm/global
""")
BROKER_SCRIPT = script("""\
set -eu
printf '%s\\n' "ENDPOINT_PROVISION=$ENDPOINT_PROVISION" "ENDPOINT_OFFER=$ENDPOINT_OFFER" \\
  "MDNS_INTERFACES=none" > /tmp/global
exec python3 -m farm endpoint broker -c /tmp/global \\
  --endpoint-ids "$ENDPOINT_UID:$ENDPOINT_GID"
""")


def lab_global() -> GlobalConfig:
    """The lab farm's settings: the defaults for root, memory from the environment."""
    return replace(default_global({}, 0), memory_limit=MEMORY)


def _labels(kind: str, **extra: Any) -> dict[str, Any]:
    return {labels.OWNER: PREFIX, labels.TEST: TEST_LABEL, labels.KIND: kind, **extra}


def _build(g: GlobalConfig, arch: Arch | None) -> dict[str, Any]:
    """The `build` section of ARCH's server image (None: the service image)."""
    args: dict[str, Any] = {"BASE_IMAGE": BASE_IMAGES[arch or X86_64],
                            "DEBIAN_MIRROR": DEBIAN_MIRROR,
                            "APT_ALLOW_EXPIRED": APT_ALLOW_EXPIRED}
    if arch is None:
        return {"context": ".", "dockerfile": f"images/{images.SERVICE_DOCKERFILE}",
                "args": args}
    return {"context": "./images", "dockerfile": images.server_image(g, arch).dockerfile,
            "args": {**args, "SERVER_UID": SERVER_UID},
            "labels": {labels.IMAGE_ARCH: arch.debian}}


def _first(d: dict[str, Any], **first: Any) -> dict[str, Any]:
    return {**first, **{k: v for k, v in d.items() if k not in first}}


def target_spec(t: Target, g: GlobalConfig) -> dict[str, Any]:
    """The container spec of T: what `stap-server start` would run, with compose's
    variables in place of the host's values."""
    plan = resolve(t.strategy, t.arch, t.node)
    host = Host(arch=t.node.stap, release="", euid=0, user="root", cwd="/")
    cfg = resolve_server(ServerDraft(arch=t.arch.stap, releases=[t.release],
                                     nickname=t.nickname, log=LOG, port=t.port,
                                     strategy=t.strategy, source=SOURCE), g, host)
    where = Placement(image=images.image_tag(g, plan.image_arch),
                      kernels_volume=f"kernels-{plan.image_arch.debian}", uid=SERVER_UID,
                      gid=SERVER_GID, home_dir="home", log_file="log", port=t.port,
                      hostname=HOSTNAME, prefix=PREFIX, test_label=TEST_LABEL)
    spec = server_spec(cfg, plan, where, g)
    # The configuration with its integers as compose variables (JSON numbers once set).
    spec["labels"][labels.CONFIG] = json_with_vars(cfg.to_dict())
    return spec


def server_service(t: Target, g: GlobalConfig, build: bool
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """T's service and its override (start after its node's init job; profile arm64 for
    what only arm64 nodes run)."""
    svc, over = service(target_spec(t, g), cpus=CPUS)
    first: dict[str, Any] = {"image": svc["image"]}
    if build:
        first["build"] = _build(g, resolve(t.strategy, t.arch, t.node).image_arch)
    first["entrypoint"] = [*TINI_SH, SERVER_WAIT, "server"]
    if t.node != X86_64:  # a compose host is x86_64 (compose ignores placement)
        over["profiles"] = ["arm64"]
    over["depends_on"] = {INIT[t.node]: DONE}
    return _first(svc, **first), over


def init_service(node: Arch, g: GlobalConfig) -> dict[str, Any]:
    """The one-shot job of NODE's architecture: volumes' owners, certificate databases."""
    return {
        "image": images.image_tag(g, node),
        "user": "0:0", "hostname": HOSTNAME,
        "entrypoint": TINI_SH, "command": [INIT_SCRIPT],
        "environment": {"HOME": HOME, "SERVER_UID": SERVER_UID, "SERVER_GID": SERVER_GID,
                        "ENDPOINT_UID": ENDPOINT_UID, "ENDPOINT_GID": ENDPOINT_GID,
                        "CERT_NAMES": CERT_NAMES},
        "read_only": True, "cap_drop": ["ALL"], "cap_add": ["CHOWN", "SETUID", "SETGID", "FOWNER"],
        "security_opt": ["no-new-privileges"],
        "volumes": [_vol("home", HOME), _vol("log", "/var/log/stapfarm"),
                    _vol("identity", service_specs.ENDPOINT_MOUNT),
                    _vol("modcache", service_specs.CACHE_MOUNT)],
        "labels": _labels("job"),
        "deploy": {"mode": "global",
                   "restart_policy": {"condition": "on-failure", "max_attempts": 3},
                   "placement": {"constraints": [f"node.platform.arch == {node.machine}"]}},
    }


def _vol(source: str, target: str, *, read_only: bool = False, kind: str = "volume"
         ) -> dict[str, Any]:
    out = {"type": kind, "source": source, "target": target}
    return {**out, "read_only": True} if read_only else out


def _tmpfs(target: str, size: int, mode: int | None = None) -> dict[str, Any]:
    fs = {"size": size} if mode is None else {"size": size, "mode": mode}
    return {"type": "tmpfs", "target": target, "tmpfs": fs}


def advertiser_service(g: GlobalConfig, build: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """advertiser_spec's container with MDNS_INTERFACES, one per node."""
    spec = service_specs.advertiser_spec(images.service_tag(g), "", PREFIX, [],
                                         g.probe_address, TEST_LABEL)
    svc, over = service(spec)
    first: dict[str, Any] = {"image": svc["image"]}
    if build:
        first["build"] = _build(g, None)
    first.update(entrypoint=[*TINI_SH, ADVERTISER_WRAP, "advertiser"],
                 command=svc["command"],
                 environment={"MDNS_INTERFACES": StrVar("STAPFARM_MDNS_INTERFACES")})
    svc["deploy"] = {"mode": "global", **svc["deploy"]}
    return _first(svc, **first), over


def _endpoint_env() -> dict[str, Any]:
    return {"STAPFARM_PREFIX": PREFIX, "STAPFARM_TEST_LABEL": TEST_LABEL}


def endpoint_services(g: GlobalConfig) -> dict[str, dict[str, Any]]:
    """The endpoint's front door and broker (farm/endpoint/): on the host network, talking
    over the broker's socket in the endpoint-run volume; settings from the environment."""
    common = {"read_only": True, "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
              "restart": "unless-stopped", "stop_signal": "SIGTERM"}
    sock = service_specs.DOCKER_SOCKET
    frontdoor = {
        "image": images.service_tag(g), "user": f"{ENDPOINT_UID}:{ENDPOINT_GID}",
        "entrypoint": [*TINI_SH, FRONTDOOR_SCRIPT],
        "environment": {**_endpoint_env(), "STAPFARM_CONFIG_FILE": "", "HOME": "/run/stapfarm",
                        **service_specs.MALLOC, "ENDPOINT_PORT": ENDPOINT_PORT,
                        "ENDPOINT_METRICS_PORT": METRICS_PORT, "ENDPOINT_PROVISION": PROVISION,
                        "ENDPOINT_OFFER": OFFER,
                        "ENDPOINT_CACHE_SIZE": StrVar("STAPFARM_ENDPOINT_CACHE_SIZE", "4g")},
        "networks": ["hostnet"],
        "volumes": [_vol("identity", service_specs.ENDPOINT_MOUNT, read_only=True),
                    _vol("modcache", service_specs.CACHE_MOUNT),
                    _vol("endpoint-run", service_specs.RUN_MOUNT, read_only=True),
                    # the global file and the exported key, private to this user
                    _tmpfs("/run/stapfarm", 16 << 20, 0o1777)],
        **common,
        "labels": _labels("endpoint", **{labels.PORT: ENDPOINT_PORT,
                                         f"{labels.PREFIX}.metrics-port": METRICS_PORT,
                                         labels.OFFERS: OFFER}),
        "deploy": {"mode": "global", "resources": {"limits": {"memory": "1g", "pids": 128}}},
    }
    broker = {
        "image": images.service_tag(g), "user": "0:0",
        "entrypoint": [*TINI_SH, BROKER_SCRIPT],
        "environment": {**_endpoint_env(), "STAPFARM_HOSTNAME": HOSTNAME,
                        "STAPFARM_CONFIG_FILE": "",
                        "STAPFARM_HOME_VOLUME": StrVar("STAPFARM_HOME_VOLUME", "stapfarm-home"),
                        "STAPFARM_LOG_VOLUME": StrVar("STAPFARM_LOG_VOLUME", "stapfarm-log"),
                        "STAPFARM_SERVER_UID": SERVER_UID, "STAPFARM_SERVER_GID": SERVER_GID,
                        "ENDPOINT_UID": ENDPOINT_UID, "ENDPOINT_GID": ENDPOINT_GID,
                        "ENDPOINT_PROVISION": PROVISION, "ENDPOINT_OFFER": OFFER},
        "networks": ["hostnet"],
        "volumes": [_vol(sock, sock, kind="bind"),
                    _vol("modcache", service_specs.CACHE_MOUNT),
                    _vol("endpoint-run", service_specs.RUN_MOUNT),
                    _tmpfs("/tmp", 16 << 20), _tmpfs("/var/lib/stapfarm", 256 << 20),
                    # provisioning spools a kernel tree's packages here (farm/kernels/)
                    _tmpfs("/var/tmp", 768 << 20)],
        **common, "cap_add": ["DAC_OVERRIDE", "CHOWN", "FOWNER"],
        "labels": _labels(service_specs.BROKER_KIND),
        "deploy": {"mode": "global", "resources": {"limits": {"memory": "2g", "pids": 256}}},
    }
    return {"endpoint": frontdoor, service_specs.BROKER_KIND: broker}


def volumes() -> dict[str, Any]:
    """The farm's volumes: its own (labelled), the kernel trees (the farm's, external)."""
    own = {"identity": f"{PREFIX}-identity",
           "endpoint-run": service_specs.run_volume(PREFIX),
           "modcache": service_specs.cache_volume(PREFIX)}
    out: dict[str, Any] = {k: {"name": name, "labels": _labels(k)} for k, name in own.items()}
    for arch, var in KERNELS_VOLUMES.items():
        out[f"kernels-{arch.debian}"] = {
            "external": True, "name": StrVar(var, volume_name("stapfarm", arch))}
    for k in ("home", "log"):
        out[k] = {"name": StrVar(f"STAPFARM_{k.upper()}_VOLUME", f"stapfarm-{k}"),
                  "labels": _labels(k)}
    return out


def lab_documents(*, build: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """compose.yaml and compose.override.yaml as data (BUILD: with `build` sections)."""
    g = lab_global()
    services: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    built: set[str] = set()
    for t in TARGETS:
        if t.node == X86_64 and INIT[X86_64] not in services:
            services[INIT[X86_64]] = init_service(X86_64, g)
            overrides[INIT[X86_64]] = {"network_mode": "none"}
        image = images.image_tag(g, resolve(t.strategy, t.arch, t.node).image_arch)
        services[t.name], overrides[t.name] = server_service(t, g, build and image not in built)
        built.add(image)
    services[INIT[ARM64]] = init_service(ARM64, g)
    overrides[INIT[ARM64]] = {"profiles": ["arm64"], "network_mode": "none"}
    services["advertiser"], overrides["advertiser"] = advertiser_service(g, build)
    for name, svc in endpoint_services(g).items():
        services[name] = svc
        overrides[name] = {"networks": Reset([]), "network_mode": "host",
                           "depends_on": {INIT[X86_64]: DONE}}
    base = {"version": "3.9", "services": services, "volumes": volumes(),
            "networks": {"default": {"labels": {labels.OWNER: PREFIX, labels.TEST: TEST_LABEL}},
                         "hostnet": {"external": True, "name": "host"}}}
    return base, {"services": overrides}


def lab_files(*, build: bool = True) -> dict[str, str]:
    """The lab farm's files by name, as `stap-server compose` writes them."""
    base, override = lab_documents(build=build)
    return {FILES[0]: dump(base, HEADER), FILES[1]: dump(override, OVERRIDE_HEADER)}
