"""The farm's images, one builder for all: the server images (`stapfarm/server:<uname -m>`,
images/Dockerfile.<uname -m>) and the service image (`stapfarm/service:latest`,
images/Dockerfile.service: the advertiser and the endpoint, with the farm package).

An image is built only when its inputs change: a hash of its Dockerfile, the files it
copies and its build arguments is its `org.stapfarm.inputs-hash` label. A base image
missing locally is pulled, else bootstrapped from Debian packages (images/bootstrap-base.sh).

    build(engine, gcfg, server_image(gcfg, Arch.host()), say)    # if outdated
    require(engine, server_image(gcfg, arch))                      # ImageError if missing
"""

from __future__ import annotations

import hashlib
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.core import labels
from farm.core.arch import Arch
from farm.core.errors import ImageError
from farm.core.spec import GlobalConfig
from farm.engine.docker import Engine

Say = Callable[[str], None]
SUITE = "forky"  # systemtap >= 5.6: see images/Dockerfile.x86_64
DEFAULT_SERVER_UID = 155  # upstream's stap-server uid (systemtap.spec)
PACKAGE = Path(__file__).resolve().parent.parent  # the farm package (the service image's)
IMAGES = PACKAGE.parent / "images"  # the repository's images/ directory
SERVICE_DOCKERFILE = "Dockerfile.service"
ALLOW_EXPIRED = f"{labels.PREFIX}.apt-allow-expired"  # how an image was built, yes/no


@dataclass(frozen=True)
class ImageSpec:
    """What one image is built from."""

    tag: str
    arch: Arch
    dockerfile: str  # its name in the build context
    files: tuple[tuple[str, Path], ...]  # (path in the context, source): what it copies
    args: tuple[tuple[str, str], ...]  # build arguments, sorted
    kind: str  # server | service

    def digest(self) -> str:
        """Hash of the Dockerfile, the files and the arguments (the inputs-hash label).

        APT_ALLOW_EXPIRED is left out: it is whether this build may accept an expired
        Release file, not an input of the image (an image built with it is not outdated
        for a farm that has not opted in)."""
        h = hashlib.sha256()
        for rel, src in self.files:
            h.update(rel.encode() + b"\0" + src.read_bytes() + b"\0")
        for key, value in self.args:
            if key != "APT_ALLOW_EXPIRED":
                h.update(f"{key}={value}\0".encode())
        return h.hexdigest()[:16]


def images_dir(gcfg: GlobalConfig) -> Path:
    """The Dockerfiles and scripts: IMAGES_DIR when set (tests), else the repository's."""
    return Path(gcfg.images_dir) if gcfg.images_dir else IMAGES


def image_tag(gcfg: GlobalConfig, arch: Arch) -> str:
    """The server image of ARCH (`stapfarm/server:x86_64`)."""
    return f"{gcfg.image_prefix}:{arch.machine}"


def service_tag(gcfg: GlobalConfig) -> str:
    """The service image (`stapfarm/service:latest`) beside the server images."""
    repo = gcfg.image_prefix.rsplit("/", 1)[0] if "/" in gcfg.image_prefix else "stapfarm"
    return f"{repo}/service:latest"


def base_tag(arch: Arch, suite: str = SUITE) -> str:
    return f"stapfarm/base:{suite}-{arch.debian}"


def server_uid() -> int:
    """The uid the images give their stap-server user: the host's, so files agree."""
    try:
        return pwd.getpwnam("stap-server").pw_uid
    except KeyError:
        return DEFAULT_SERVER_UID


def _args(gcfg: GlobalConfig, arch: Arch, allow_expired: bool, **extra: str
          ) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"BASE_IMAGE": base_tag(arch), "SUITE": SUITE,
                         "DEBIAN_MIRROR": gcfg.debian_mirror,
                         "APT_ALLOW_EXPIRED": "yes" if allow_expired else "no",
                         **extra}.items()))


def server_image(gcfg: GlobalConfig, arch: Arch, *, allow_expired: bool | None = None
                 ) -> ImageSpec:
    """ARCH's server image (ALLOW_EXPIRED: accept an expired Release; default APT_ALLOW_EXPIRED)."""
    d = images_dir(gcfg)
    names = (f"Dockerfile.{arch.machine}", "install-server.sh", "server-entry.sh")
    expired = gcfg.apt_allow_expired if allow_expired is None else allow_expired
    return ImageSpec(tag=image_tag(gcfg, arch), arch=arch, dockerfile=names[0],
                     files=tuple((n, d / n) for n in names),
                     args=_args(gcfg, arch, expired, SERVER_UID=str(server_uid())),
                     kind="server")


def service_image(gcfg: GlobalConfig, *, allow_expired: bool) -> ImageSpec:
    """The service image for this host's architecture."""
    arch = Arch.host()
    sources = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    files = ((SERVICE_DOCKERFILE, images_dir(gcfg) / SERVICE_DOCKERFILE),
             *((str(Path("farm") / p.relative_to(PACKAGE)), p) for p in sources))
    return ImageSpec(tag=service_tag(gcfg), arch=arch, dockerfile=SERVICE_DOCKERFILE,
                     files=files, args=_args(gcfg, arch, allow_expired), kind="service")


def status(engine: Engine, spec: ImageSpec) -> str:
    """'up to date', 'outdated' or 'missing'."""
    image = engine.image(spec.tag)
    if image is None:
        return "missing"
    have = (image.labels or {}).get(labels.IMAGE_INPUTS, "")
    return "up to date" if have == spec.digest() else "outdated"


def built_allowing_expired(engine: Engine, gcfg: GlobalConfig) -> bool:
    """Whether the host's server image was built accepting an expired Release file (`images
    build --allow-expired-release`): images built later (the service image) do the same."""
    image = engine.image(image_tag(gcfg, Arch.host()))
    return bool(image is not None and (image.labels or {}).get(ALLOW_EXPIRED) == "yes")


def ensure_base(engine: Engine, gcfg: GlobalConfig, arch: Arch, say: Say) -> str:
    """Make the base image present: local, else pulled, else bootstrapped with debootstrap.

    Raises:
        ImageError: bootstrapping failed.
    """
    tag = base_tag(arch)
    if engine.image(tag) is not None:
        return tag
    say(f"base image {tag} is missing; trying debian:{SUITE}-slim from a registry")
    pulled = engine.pull("debian", f"{SUITE}-slim", arch.docker_platform)
    if pulled is not None:
        engine.tag(pulled, tag)
        return tag
    say("no registry reachable: bootstrapping the base from Debian packages (debootstrap)")
    script = images_dir(gcfg) / "bootstrap-base.sh"
    proc = subprocess.run(["bash", str(script), SUITE, arch.debian, tag, gcfg.debian_mirror],
                          check=False)
    if proc.returncode != 0:
        raise ImageError(f"bootstrapping base image {tag} failed (exit {proc.returncode})",
                         hint="debootstrap needs root, and qemu-user-static with binfmt_misc "
                              "for a foreign architecture: run `make up` once")
    return tag


def build(engine: Engine, gcfg: GlobalConfig, spec: ImageSpec, say: Say, *,
          force: bool = False) -> Any:
    """Build SPEC unless an image with the same inputs exists; return the image.

    Raises:
        ImageError: the build failed (the last lines of its output are in the message).
    """
    state = status(engine, spec)
    if state == "up to date" and not force:
        say(f"{spec.tag}: up to date")
        return engine.image(spec.tag)
    ensure_base(engine, gcfg, spec.arch, say)
    digest = spec.digest()
    say(f"{spec.tag}: building ({state}; inputs {digest})")
    image_labels = {labels.IMAGE_INPUTS: digest, labels.IMAGE_ARCH: spec.arch.debian,
                    ALLOW_EXPIRED: dict(spec.args)["APT_ALLOW_EXPIRED"]}
    with tempfile.TemporaryDirectory(prefix="stapfarm-image-") as tmp:
        for rel, src in spec.files:
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, Path(tmp) / rel)
        return engine.build(path=tmp, dockerfile=spec.dockerfile, tag=spec.tag,
                            buildargs=dict(spec.args), platform=spec.arch.docker_platform,
                            image_labels=image_labels, say=say,
                            show=lambda line: line.startswith("Step ")
                            or "Systemtap translator" in line)


def ensure_service_image(engine: Engine, gcfg: GlobalConfig, say: Say = lambda s: None
                         ) -> Any:
    """The service image, built when its inputs changed (the farm package, its Dockerfile),
    accepting an expired Release when the server images were built so.

    Raises:
        ImageError: the build failed.
    """
    allow = gcfg.apt_allow_expired or built_allowing_expired(engine, gcfg)
    spec = service_image(gcfg, allow_expired=allow)
    if status(engine, spec) == "up to date":
        return engine.image(spec.tag)
    return build(engine, gcfg, spec, say)


def require(engine: Engine, gcfg: GlobalConfig, arch: Arch) -> str:
    """The tag of ARCH's server image, which must exist.

    Raises:
        ImageError: it was never built.
    """
    tag = image_tag(gcfg, arch)
    if engine.image(tag) is None:
        raise ImageError(f"server image {tag} is missing",
                         hint=f"build it with `stap-server images build -a {arch.machine}`")
    return tag
