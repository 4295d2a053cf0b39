"""Kernel devel trees by release: discovered on a Debian mirror, kept in Docker volumes
(the store: farm/engine/trees.py).

One volume per image architecture holds a merged filesystem (usr/src, usr/lib/modules,
usr/lib/debug, boot) that servers mount read-only at /srv/stapfarm/kernels, where the image's
/usr/src, /lib/modules, /usr/lib/debug and /boot point. A tree is (release, target arch,
image arch): the release's headers and -common headers, the linux-kbuild helpers built for the
*image's* architecture (never apt-installed: that drags in an emulated compiler), and with
debuginfo the kernel's vmlinux and System.map from linux-image-<release>-dbg. A tree exists
once its manifest is written, so an interrupted download leaves no half tree behind.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from debian.debian_support import Version

from farm.core.arch import Arch
from farm.core.errors import KernelTreeError
from farm.kernels.debian import Mirror, Package, depends_names

MOUNT = "/srv/stapfarm/kernels"
MANIFESTS = ".stapfarm/trees"
Say = Callable[[str], None]


@dataclass(frozen=True)
class KernelTree:
    """A kernel devel tree present in the farm's kernel volume for one image architecture."""

    release: str
    arch: str  # target, stap name
    image_arch: str  # stap name of the image architecture that uses it
    abi: str
    compiler: str  # what .kernelvariables asks for, e.g. aarch64-linux-gnu-gcc-14
    debuginfo: bool
    packages: dict[str, str]  # name -> version
    created: float = 0.0

    @property
    def tree_id(self) -> str:
        return f"{self.release}@{self.image_arch}"


def volume_name(prefix: str, image_arch: Arch) -> str:
    return f"{prefix}-kernels-{image_arch.debian}"


def available(mirror: Mirror, suites: tuple[str, ...], arch: Arch) -> list[str]:
    """Releases the mirror offers for ARCH now, newest first."""
    found: dict[str, Version] = {}
    for suite in suites:
        for pkg in mirror.packages(suite, arch.debian):
            rel = _release_of_headers(pkg, arch)
            if rel and (rel not in found or Version(pkg.version) > found[rel]):
                found[rel] = Version(pkg.version)
    return sorted(found, key=lambda rel: (found[rel], rel), reverse=True)


def _release_of_headers(pkg: Package, arch: Arch) -> str | None:
    """The release of a flavour headers package for ARCH's default flavour, else None."""
    if not pkg.name.startswith("linux-headers-") or pkg.architecture != arch.debian:
        return None
    rel = pkg.name[len("linux-headers-"):]
    for dep in depends_names(pkg.depends):
        m = re.fullmatch(r"linux-headers-(.+)-common", dep)
        if m and rel == f"{m.group(1)}-{arch.debian}":
            return rel
    return None


def _index(mirror: Mirror, suites: tuple[str, ...], debarch: str) -> dict[str, Package]:
    index: dict[str, Package] = {}
    for suite in suites:
        for pkg in mirror.packages(suite, debarch):
            old = index.get(pkg.name)
            if old is None or Version(pkg.version) > Version(old.version):
                index[pkg.name] = pkg
    return index


def parse_kernelvariables(text: str) -> str:
    """The compiler a Debian headers tree pins, e.g. `aarch64-linux-gnu-gcc-14`."""
    cc = cross = ""
    for line in text.splitlines():
        m = re.match(r"\s*(?:override\s+)?(CC|CROSS_COMPILE)\s*:?=\s*(.*)", line)
        if not m:
            continue
        if m.group(1) == "CC":
            cc = m.group(2).split()[-1] if m.group(2).split() else ""
        else:
            cross = m.group(2).strip()
    return cc.replace("$(CROSS_COMPILE)", cross)


@dataclass(frozen=True)
class TreePackages:
    """The packages of one tree: the flavour's headers, its -common headers, the kbuild
    helpers built for the image's architecture, and (debuginfo) the -dbg image."""

    headers: Package
    abi: str
    wanted: tuple[Package, ...]


def tree_packages(mirror: Mirror, suites: tuple[str, ...], target: Arch, image_arch: Arch,
                  release: str, debuginfo: bool) -> TreePackages:
    """What RELEASE's tree for TARGET, used by IMAGE_ARCH's image, is made of.

    Raises:
        KernelTreeError: no such release, or a package it needs is missing from the mirror.
        MirrorError: the mirror cannot be read.
    """
    target_index = _index(mirror, suites, target.debian)
    headers = target_index.get(f"linux-headers-{release}")
    if headers is None or _release_of_headers(headers, target) is None:
        offered = available(mirror, suites, target)[:5]
        raise KernelTreeError(
            f"no kernel release '{release}' for {target} in {' '.join(suites)} on "
            f"{mirror.url} (newest there: {', '.join(offered) or 'none'})",
            hint="list them with `stap-server kernels available -a "
                 f"{target.machine}`, or pass a build tree with -r /path/to/build")
    deps = depends_names(headers.depends)
    common_name = next((d for d in deps if re.fullmatch(r"linux-headers-.+-common", d)), "")
    common = target_index.get(common_name)
    if common is None:
        raise KernelTreeError(f"{headers.name} on {mirror.url} depends on no -common "
                              "headers package the mirror has", hint="try another release")
    abi = common_name[len("linux-headers-"):-len("-common")]
    kbuild_name = next((d for d in deps if d.startswith("linux-kbuild-")),
                       f"linux-kbuild-{abi}")
    image_index = (target_index if image_arch == target
                   else _index(mirror, suites, image_arch.debian))
    kbuild = image_index.get(kbuild_name)
    if kbuild is None:
        raise KernelTreeError(f"the mirror has no {kbuild_name} for {image_arch.debian} (the "
                              f"kbuild helpers the {image_arch} image runs)")
    wanted = [headers, common, kbuild]
    if debuginfo:
        dbg = target_index.get(f"linux-image-{release}-dbg")
        if dbg is None:
            raise KernelTreeError(f"no debuginfo package linux-image-{release}-dbg on "
                                  f"{mirror.url}")
        wanted.append(dbg)
    return TreePackages(headers=headers, abi=abi, wanted=tuple(wanted))


def progress(name: str, say: Say) -> Callable[[int, int], None]:
    state = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if total and done / total >= state["next"]:
            say(f"  {name}: {100 * done // total}% of {total / 1e6:.1f} MB")
            state["next"] += 0.25

    return report


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def split_json(text: str) -> list[dict[str, Any]]:
    docs = []
    decoder = json.JSONDecoder()
    i = 0
    text = text.strip()
    while i < len(text):
        doc, end = decoder.raw_decode(text, i)
        docs.append(doc)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return docs


def cache_dir(state_dir: str) -> Path:
    return Path(state_dir) / "cache"
