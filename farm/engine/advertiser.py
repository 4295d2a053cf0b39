"""The advertiser's image and container: built when its inputs change, run once per farm.

    ensure_advertiser(client, gcfg, prefix)   # idempotent; called by `stap-server start`
    advertiser_state(client, prefix)          # one line for `status`
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from docker.types import Mount

from farm.core import labels
from farm.core.arch import Arch
from farm.core.errors import ImageError, ServerError
from farm.core.spec import GlobalConfig
from farm.discovery import mdns
from farm.discovery.advertiser import probe_address
from farm.engine import images
from farm.engine.images import SUITE, base_tag, ensure_base, images_dir

Say = Callable[[str], None]
DOCKERFILE = "Dockerfile.advertiser"
DOCKER_SOCKET = "/var/run/docker.sock"
PACKAGE = Path(__file__).resolve().parent  # the farm package, copied into the image


def image_tag(gcfg: GlobalConfig) -> str:
    """`stapfarm/advertiser:latest` beside the server images (`stapfarm/server:<arch>`)."""
    repo = gcfg.image_prefix.rsplit("/", 1)[0] if "/" in gcfg.image_prefix else "stapfarm"
    return f"{repo}/advertiser:latest"


def build_args(gcfg: GlobalConfig, arch: Arch, allow_expired: bool = False) -> dict[str, str]:
    return {"BASE_IMAGE": base_tag(arch), "SUITE": SUITE, "DEBIAN_MIRROR": gcfg.debian_mirror,
            "APT_ALLOW_EXPIRED": "yes" if gcfg.apt_allow_expired or allow_expired else "no"}


def server_images_allow_expired(client: Any, gcfg: GlobalConfig, arch: Arch) -> bool:
    """Whether ARCH's server image was built accepting an expired Release file (`images
    build --allow-expired-release`): the advertiser is then built the same way."""
    image = images.find_image(client, images.image_tag(gcfg, arch))
    if image is None:
        return False
    args = dict(images.build_args(gcfg, arch), APT_ALLOW_EXPIRED="yes")
    want = images.inputs_hash(images_dir(), arch, args)
    return bool((image.labels or {}).get(labels.IMAGE_INPUTS) == want)


def _sources(package: Path) -> list[Path]:
    """The package's modules, sub-packages included, relative to PACKAGE."""
    return sorted(p.relative_to(package) for p in package.rglob("*.py") if p.is_file()
                  and "__pycache__" not in p.parts)


def inputs_hash(dockerfile: Path, package: Path, args: dict[str, str]) -> str:
    """Hash of the Dockerfile, the farm package's modules and the build arguments."""
    h = hashlib.sha256(dockerfile.read_bytes())
    for rel in _sources(package):
        h.update(b"\0" + str(rel).encode() + b"\0" + (package / rel).read_bytes())
    for key in sorted(args):
        h.update(f"\0{key}={args[key]}".encode())
    return h.hexdigest()[:16]


def ensure_image(client: Any, gcfg: GlobalConfig, say: Say = lambda s: None) -> Any:
    """The advertiser image, built (base bootstrapped if needed) unless its inputs match.

    Raises:
        ImageError: the build failed.
    """
    arch = Arch.host()
    args = build_args(gcfg, arch, server_images_allow_expired(client, gcfg, arch))
    dockerfile = images_dir() / DOCKERFILE
    digest = inputs_hash(dockerfile, PACKAGE, args)
    tag = image_tag(gcfg)
    image = images.find_image(client, tag)
    if image is not None and (image.labels or {}).get(labels.IMAGE_INPUTS) == digest:
        return image
    ensure_base(client, arch, gcfg, say)
    say(f"{tag}: building (inputs {digest})")
    with tempfile.TemporaryDirectory(prefix="stapfarm-advertiser-") as tmp:
        context = Path(tmp)
        shutil.copy(dockerfile, context / DOCKERFILE)
        for rel in _sources(PACKAGE):
            (context / "farm" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(PACKAGE / rel, context / "farm" / rel)
        tail: list[str] = []
        error = ""
        for chunk in client.api.build(path=str(context), dockerfile=DOCKERFILE, tag=tag,
                                      buildargs=args, platform=arch.docker_platform,
                                      labels={labels.IMAGE_INPUTS: digest}, rm=True,
                                      forcerm=True, pull=False, decode=True):
            if "error" in chunk:
                error = str(chunk["error"]).strip()
            for line in str(chunk.get("stream", "")).splitlines():
                if line.strip():
                    tail = (tail + [line])[-15:]
    if error:
        raise ImageError(f"building {tag} failed: {error}\n" + "\n".join(tail),
                         hint="on a mirror serving an expired testing Release, set "
                              "APT_ALLOW_EXPIRED=yes in the global configuration")
    return client.images.get(tag)


def container_name(prefix: str) -> str:
    return f"{prefix}-advertiser"


def container_spec(image: str, image_id: str, prefix: str, interfaces: Sequence[str],
                   probe_addr: str, test_label: str = "",
                   docker_socket: str = DOCKER_SOCKET) -> dict[str, Any]:
    """Keyword arguments for `client.containers.run(detach=True, **spec)`."""
    command = ["--prefix", prefix, "--probe-address", probe_addr]
    for i in interfaces:
        command += ["--interface", i]
    spec: dict[str, Any] = {
        "image": image,
        "name": container_name(prefix),
        "command": command,
        # mDNS must leave from the host's own interfaces with the host's addresses.
        "network_mode": "host",
        "mounts": [Mount(DOCKER_SOCKET, docker_socket, type="bind")],
        "restart_policy": {"Name": "unless-stopped"},
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": "128m",
        "pids_limit": 64,
        "stop_signal": "SIGTERM",
    }
    body = {k: v for k, v in spec.items() if k != "mounts"}
    body["mounts"] = [dict(sorted(m.items())) for m in spec["mounts"]]
    body["image_id"] = image_id
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    spec["labels"] = {labels.OWNER: prefix, labels.KIND: "advertiser",
                      labels.SPEC_HASH: digest}
    if test_label:
        spec["labels"][labels.TEST] = test_label
    return spec


def _existing(client: Any, prefix: str) -> Any:
    import docker.errors

    try:
        return client.containers.get(container_name(prefix))
    except docker.errors.NotFound:
        return None


def _foreign(client: Any, prefix: str) -> Any:
    """A running advertiser of PREFIX that the farm's CLI did not create (compose, Swarm)."""
    for c in client.containers.list(filters={"label": [f"{labels.OWNER}={prefix}",
                                                       f"{labels.KIND}=advertiser"]}):
        if c.name != container_name(prefix):
            return c
    return None


def _retire(container: Any) -> None:
    """Stop (so it sends its goodbyes) and remove an advertiser container."""
    import docker.errors

    try:
        if container.status in ("running", "restarting"):
            container.stop(timeout=5)
        container.remove(force=True)
    except docker.errors.NotFound:
        pass


def ensure_advertiser(client: Any, gcfg: GlobalConfig, prefix: str, test_label: str = "",
                      *, say: Say = lambda s: None,
                      docker_socket: str = DOCKER_SOCKET) -> Any:
    """Make sure PREFIX's advertiser container runs with GCFG's interfaces; return it
    (None when MDNS_INTERFACES=none, which also retires a running advertiser).

    Idempotent: an advertiser already running with the same image and settings is kept.

    Raises:
        ConfigError: MDNS_INTERFACES names no interface or address of this host.
        ImageError: its image could not be built.
        ServerError: Docker refused to run it.
    """
    import docker.errors

    current = _existing(client, prefix)
    foreign = _foreign(client, prefix)
    if foreign is not None:  # compose's or a stack's advertiser already follows PREFIX
        return foreign
    if mdns.disabled(gcfg.mdns_interfaces):
        if current is not None:
            _retire(current)
        return None
    from farm.discovery.publisher import host_interfaces

    mdns.choose_addresses(gcfg.mdns_interfaces, host_interfaces())  # fail here, not looping
    image = ensure_image(client, gcfg, say)
    spec = container_spec(image_tag(gcfg), str(image.id), prefix, gcfg.mdns_interfaces,
                          probe_address(gcfg.listen_address), test_label, docker_socket)
    if current is not None:
        if current.labels.get(labels.SPEC_HASH) == spec["labels"][labels.SPEC_HASH] \
                and current.status == "running":
            return current
        _retire(current)
    try:
        return client.containers.run(detach=True, **spec)
    except docker.errors.APIError as e:
        if e.status_code == 409:  # a concurrent `start` created it first
            again = _existing(client, prefix)
            if again is not None:
                return again
        raise ServerError(f"docker refused to start the mDNS advertiser: "
                          f"{e.explanation or e}") from e


def advertiser_state(client: Any, prefix: str) -> str:
    """One line for `status`: whether PREFIX's advertiser runs, and where it advertises."""
    c = _existing(client, prefix) or _foreign(client, prefix)
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
