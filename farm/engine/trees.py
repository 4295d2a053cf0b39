"""The kernel tree store: one Docker volume per image architecture (layout and rules:
farm/kernels/trees.py), written by a root helper container of the image that uses it."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
import uuid
from dataclasses import asdict
from typing import Any

from farm.core.arch import Arch
from farm.core.errors import KernelTreeError
from farm.engine.docker import Engine
from farm.kernels.debian import Mirror, Package, iter_data_members
from farm.kernels.trees import (
    MANIFESTS,
    MOUNT,
    KernelTree,
    Say,
    parse_kernelvariables,
    progress,
    split_json,
    tar_of,
    tree_packages,
    volume_name,
)


class TreeStore:
    """The kernel trees of one image architecture, in its Docker volume."""

    def __init__(self, engine: Engine, image_arch: Arch, image: str) -> None:
        self.engine = engine
        self.image_arch = image_arch
        self.image = image
        self.volume = volume_name(engine.prefix, image_arch)

    def _job(self) -> Any:
        """A root helper container with the volume mounted read-write (caller removes it).

        Raises:
            ImageError: the image is missing.
        """
        self.engine.ensure_volume(self.volume, "kernels", **{
            "org.stapfarm.image-arch": self.image_arch.debian})
        return self.engine.helper(self.image, what=f"a helper for volume {self.volume}",
                                  user="0:0", network_mode="none",
                                  volumes={self.volume: {"bind": MOUNT, "mode": "rw"}},
                                  platform=self.image_arch.docker_platform)

    def _sh(self, job: Any, script: str) -> tuple[int, str]:
        return self.engine.exec(job, ["sh", "-c", script])

    def list(self) -> list[KernelTree]:
        """Every complete tree in the volume."""
        if not self.engine.volume_exists(self.volume):
            return []
        job = self._job()
        try:
            _code, out = self._sh(job, f"cat {MOUNT}/{MANIFESTS}/*.json 2>/dev/null"
                                       " | tr '\\n' ' '; echo")
        finally:
            self.engine.remove(job, timeout=1)
        trees = []
        for doc in split_json(out):
            try:
                trees.append(KernelTree(**doc))
            except TypeError as e:  # a manifest of another version of the farm
                raise KernelTreeError(f"volume {self.volume} holds a manifest this farm "
                                      f"cannot read ({e})") from e
        return sorted(trees, key=lambda t: t.release)

    def get(self, release: str) -> KernelTree | None:
        return next((t for t in self.list() if t.release == release), None)

    def add(self, mirror: Mirror, suites: tuple[str, ...], target: Arch, release: str, *,
            debuginfo: bool = False, say: Say = lambda s: None) -> KernelTree:
        """Download and install RELEASE's tree for TARGET (idempotent).

        Raises:
            KernelTreeError: unknown release, or the image lacks the compiler it pins.
            MirrorError: the mirror cannot be read or a download is corrupt.
        """
        existing = self.get(release)
        if existing and (existing.debuginfo or not debuginfo):
            return existing
        pkgs = tree_packages(mirror, suites, target, self.image_arch, release, debuginfo)
        job = self._job()
        staging = f"{MOUNT}/.stapfarm/staging/{uuid.uuid4().hex[:12]}"
        try:
            # Only leftovers of interrupted adds are removed: a concurrent add's staging
            # directory is younger than a day.
            self._sh(job, f"mkdir -p {MOUNT}/.stapfarm/staging; find "
                          f"{MOUNT}/.stapfarm/staging -mindepth 1 -maxdepth 1 -mmin +1440 "
                          f"-exec rm -rf {{}} +; mkdir -p {staging} {MOUNT}/{MANIFESTS}")
            kernelvariables = ""
            for pkg in pkgs.wanted:
                if pkg is not pkgs.headers and self._present(job, pkg, release, pkgs.abi):
                    say(f"{pkg.name}: already present")
                    continue
                got = self._stage(job, mirror, pkg, staging, release,
                                  pkg.name.endswith("-dbg"), say)
                if pkg is pkgs.headers:
                    kernelvariables = got
            compiler = parse_kernelvariables(kernelvariables)
            if compiler and self._sh(job, f"command -v {compiler}")[0] != 0:
                raise KernelTreeError(
                    f"kernel {release} needs the compiler {compiler}, which image "
                    f"{self.image} lacks",
                    hint=f"add it to COMPILERS in images/Dockerfile.{self.image_arch.machine} "
                         "and rebuild")
            links = [f"mkdir -p {MOUNT}/usr/lib/modules/{release} {MOUNT}/usr/src/",
                     (f"ln -sfn ../../../src/linux-headers-{release} "
                      f"{MOUNT}/usr/lib/modules/{release}/build"),
                     (f"ln -sfn ../../../src/linux-headers-{pkgs.abi}-common "
                      f"{MOUNT}/usr/lib/modules/{release}/source")]
            if debuginfo:
                links += [f"mkdir -p {MOUNT}/boot",
                          (f"ln -sfn ../usr/lib/debug/boot/System.map-{release} "
                           f"{MOUNT}/boot/System.map-{release}")]
            code, out = self.engine.exec(job, ["sh", "-ec", f"cp -a {staging}/. {MOUNT}/; "
                                               f"rm -rf {staging}; " + "; ".join(links)])
            if code != 0:
                raise KernelTreeError(f"installing {release} into volume {self.volume} "
                                      f"failed: {out.strip()}")
            tree = KernelTree(release=release, arch=target.stap,
                              image_arch=self.image_arch.stap, abi=pkgs.abi, compiler=compiler,
                              debuginfo=debuginfo,
                              packages={p.name: p.version for p in pkgs.wanted},
                              created=time.time())
            manifest = json.dumps(asdict(tree), indent=1).encode()
            self.engine.put_archive(job, f"{MOUNT}/{MANIFESTS}",
                                    tar_of({f"{release}.json": manifest}))
            say(f"kernel tree {release} ({target}, for the {self.image_arch} image) is ready")
            return tree
        finally:
            self.engine.exec(job, ["rm", "-rf", staging])
            self.engine.remove(job, timeout=1)

    def _present(self, job: Any, pkg: Package, release: str, abi: str) -> bool:
        paths = {"common": f"usr/src/linux-headers-{abi}-common/Makefile",
                 "kbuild": f"usr/lib/linux-kbuild-{abi}/scripts",
                 "dbg": f"usr/lib/debug/boot/vmlinux-{release}"}
        key = ("common" if pkg.name.endswith("-common") else
               "kbuild" if pkg.name.startswith("linux-kbuild-") else
               "dbg" if pkg.name.endswith("-dbg") else "")
        if not key:
            return False
        return self.engine.exec(job, ["test", "-e", f"{MOUNT}/{paths[key]}"])[0] == 0

    def _stage(self, job: Any, mirror: Mirror, pkg: Package, staging: str, release: str,
               debug_only: bool, say: Say) -> str:
        """Stream PKG into STAGING in the volume; return its .kernelvariables if any."""
        say(f"downloading {pkg.name} {pkg.version} ({pkg.size / 1e6:.1f} MB)")
        keep_debug = ("./usr/lib/debug/boot/", f"./usr/lib/debug/lib/modules/{release}/vmlinux")
        kernelvariables = ""
        with tempfile.TemporaryFile(dir="/var/tmp") as spool:
            with tarfile.open(fileobj=spool, mode="w") as out:
                raw = mirror.open_deb(pkg)
                with raw:
                    for info, data in iter_data_members(raw, pkg, progress(pkg.name, say)):
                        if debug_only and not info.name.startswith(keep_debug):
                            continue
                        if info.name.startswith("./usr/share/"):  # docs, lintian overrides
                            continue
                        if info.name.endswith("/.kernelvariables") and data is not None:
                            content = data.read()
                            kernelvariables = content.decode("utf-8", "replace")
                            data = io.BytesIO(content)
                        out.addfile(info, data)
            spool.seek(0)
            self.engine.put_archive(job, staging, spool)
        return kernelvariables

    def remove(self, release: str) -> bool:
        """Remove RELEASE's tree; shared -common/kbuild parts only when no tree uses them."""
        trees = self.list()
        tree = next((t for t in trees if t.release == release), None)
        if tree is None:
            return False
        others = [t for t in trees if t.release != release]
        paths = [f"{MANIFESTS}/{release}.json", f"usr/src/linux-headers-{release}",
                 f"usr/lib/modules/{release}", f"usr/lib/debug/boot/vmlinux-{release}",
                 f"usr/lib/debug/boot/System.map-{release}", f"boot/System.map-{release}",
                 f"usr/lib/debug/lib/modules/{release}",
                 f"usr/lib/debug/boot/config-{release}"]
        if not any(t.abi == tree.abi for t in others):
            paths += [f"usr/src/linux-headers-{tree.abi}-common",
                      f"usr/lib/linux-kbuild-{tree.abi}", f"usr/src/linux-kbuild-{tree.abi}"]
        job = self._job()
        try:
            # The manifest goes first: from then on the tree no longer exists.
            self.engine.exec(job, ["rm", "-rf"] + [f"{MOUNT}/{p}" for p in paths])
        finally:
            self.engine.remove(job, timeout=1)
        return True
