"""Server images: bootstrap the base when no registry has it, build when inputs change."""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from farm.core import labels
from farm.core.arch import Arch
from farm.core.errors import ImageError
from farm.core.spec import GlobalConfig

Say = Callable[[str], None]
SUITE = "forky"  # systemtap >= 5.6: see images/Dockerfile.x86_64
DEFAULT_SERVER_UID = 155  # upstream's stap-server uid (systemtap.spec)


def images_dir(environ: dict[str, str] | None = None) -> Path:
    env = environ if environ is not None else dict(os.environ)
    if env.get("STAPFARM_IMAGES_DIR"):
        return Path(env["STAPFARM_IMAGES_DIR"])
    return Path(__file__).resolve().parent.parent / "images"


def image_tag(gcfg: GlobalConfig, arch: Arch) -> str:
    return f"{gcfg.image_prefix}:{arch.machine}"


def base_tag(arch: Arch, suite: str = SUITE) -> str:
    return f"stapfarm/base:{suite}-{arch.debian}"


def server_uid() -> int:
    """The uid the images give their stap-server user: the host's, so files agree."""
    try:
        return pwd.getpwnam("stap-server").pw_uid
    except KeyError:
        return DEFAULT_SERVER_UID


def build_args(gcfg: GlobalConfig, arch: Arch) -> dict[str, str]:
    return {"BASE_IMAGE": base_tag(arch), "SUITE": SUITE,
            "DEBIAN_MIRROR": gcfg.debian_mirror,
            "APT_ALLOW_EXPIRED": "yes" if gcfg.apt_allow_expired else "no",
            "SERVER_UID": str(server_uid())}


def inputs_hash(directory: Path, arch: Arch, args: dict[str, str]) -> str:
    """Hash of everything an image is built from: its Dockerfile, scripts and arguments."""
    h = hashlib.sha256()
    for name in (f"Dockerfile.{arch.machine}", "install-server.sh", "server-entry.sh"):
        h.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    for key in sorted(args):
        h.update(f"{key}={args[key]}\0".encode())
    return h.hexdigest()[:16]


def find_image(client: Any, tag: str) -> Any:
    """The local image TAG, or None."""
    import docker.errors

    try:
        return client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None


def ensure_base(client: Any, arch: Arch, gcfg: GlobalConfig, say: Say) -> str:
    """Make the base image present: local, else pulled, else bootstrapped with debootstrap."""
    import docker.errors

    tag = base_tag(arch)
    if find_image(client, tag) is not None:
        return tag
    say(f"base image {tag} is missing; trying debian:{SUITE}-slim from a registry")
    try:
        image = client.images.pull("debian", f"{SUITE}-slim", platform=arch.docker_platform)
        image.tag(tag)
        return tag
    except docker.errors.APIError:
        say("no registry reachable: bootstrapping the base from Debian packages (debootstrap)")
    script = images_dir() / "bootstrap-base.sh"
    proc = subprocess.run(["bash", str(script), SUITE, arch.debian, tag, gcfg.debian_mirror],
                          check=False)
    if proc.returncode != 0:
        raise ImageError(f"bootstrapping base image {tag} failed (exit {proc.returncode})",
                         hint="debootstrap needs root, and qemu-user-static with binfmt_misc "
                              "for a foreign architecture: run `make up` once")
    return tag


def status(client: Any, gcfg: GlobalConfig, arch: Arch) -> tuple[str, str]:
    """(tag, state) where state is 'up to date', 'outdated' or 'missing'."""
    tag = image_tag(gcfg, arch)
    image = find_image(client, tag)
    if image is None:
        return tag, "missing"
    want = inputs_hash(images_dir(), arch, build_args(gcfg, arch))
    have = (image.labels or {}).get(labels.IMAGE_INPUTS, "")
    return tag, "up to date" if have == want else "outdated"


def build(client: Any, gcfg: GlobalConfig, arch: Arch, say: Say, *, force: bool = False) -> str:
    """Build ARCH's server image unless an image with the same inputs exists; return its tag.

    Raises:
        ImageError: the build failed (the last lines of its output are in the message).
    """
    tag, state = status(client, gcfg, arch)
    if state == "up to date" and not force:
        say(f"{tag}: up to date")
        return tag
    ensure_base(client, arch, gcfg, say)
    args = build_args(gcfg, arch)
    digest = inputs_hash(images_dir(), arch, args)
    say(f"{tag}: building ({state}; inputs {digest})")
    tail: list[str] = []
    error = ""
    for chunk in client.api.build(path=str(images_dir()), dockerfile=f"Dockerfile.{arch.machine}",
                                  tag=tag, buildargs=args, platform=arch.docker_platform,
                                  labels={labels.IMAGE_INPUTS: digest,
                                          labels.IMAGE_ARCH: arch.debian},
                                  rm=True, forcerm=True, decode=True):
        if "error" in chunk:
            error = str(chunk["error"]).strip()
        for line in str(chunk.get("stream", "")).splitlines():
            if line.strip():
                tail = (tail + [line])[-15:]
                if line.startswith("Step ") or "Systemtap translator" in line:
                    say(f"  {line.strip()}")
    if error:
        raise ImageError(f"building {tag} failed: {error}\n" + "\n".join(tail),
                         hint="on a mirror serving an expired testing Release, build with "
                              "--allow-expired-release")
    return tag


def require(client: Any, gcfg: GlobalConfig, arch: Arch) -> str:
    """The tag of ARCH's server image, which must exist.

    Raises:
        ImageError: it was never built.
    """
    tag = image_tag(gcfg, arch)
    if find_image(client, tag) is None:
        raise ImageError(f"server image {tag} is missing",
                         hint=f"build it with `stap-server images build -a {arch.machine}`")
    return tag
