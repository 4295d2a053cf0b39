"""Kernel devel trees by release: discovered on a Debian mirror, kept in Docker volumes.

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
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from debian.debian_support import Version

from farm.core import labels
from farm.core.arch import Arch
from farm.core.errors import ImageError, KernelTreeError
from farm.kernels.debian import Mirror, Package, depends_names, iter_data_members

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


class TreeStore:
    """The kernel trees of one image architecture, in its Docker volume."""

    def __init__(self, client: Any, prefix: str, image_arch: Arch, image: str,
                 test_label: str = "") -> None:
        self.client = client
        self.prefix = prefix
        self.image_arch = image_arch
        self.image = image
        self.volume = volume_name(prefix, image_arch)
        self.test_label = test_label

    def _labels(self, kind: str) -> dict[str, str]:
        lab = {labels.OWNER: self.prefix, labels.KIND: kind,
               labels.IMAGE_ARCH: self.image_arch.debian}
        if self.test_label:
            lab[labels.TEST] = self.test_label
        return lab

    def ensure_volume(self) -> None:
        import docker.errors

        try:
            self.client.volumes.get(self.volume)
        except docker.errors.NotFound:
            self.client.volumes.create(self.volume, labels=self._labels("kernels"))

    def _job(self, network: bool = False) -> Any:
        """A root helper container with the volume mounted read-write (caller removes it)."""
        import docker.errors

        self.ensure_volume()
        try:
            return self.client.containers.run(
                self.image, entrypoint=["/usr/bin/tini", "--"], command=["sleep", "86400"],
                user="0:0", detach=True, network_mode="none" if not network else None,
                volumes={self.volume: {"bind": MOUNT, "mode": "rw"}},
                labels=self._labels("job"), platform=self.image_arch.docker_platform)
        except docker.errors.ImageNotFound as e:
            raise ImageError(f"image {self.image} is missing",
                             hint=f"build it: stap-server images build -a "
                                  f"{self.image_arch.machine}") from e

    def list(self) -> list[KernelTree]:
        """Every complete tree in the volume."""
        import docker.errors

        try:
            self.client.volumes.get(self.volume)
        except docker.errors.NotFound:
            return []
        job = self._job()
        try:
            _code, out = job.exec_run(["sh", "-c", (f"cat {MOUNT}/{MANIFESTS}/*.json 2>/dev/null"
                                      " | tr '\\n' ' '; echo")])
        finally:
            job.remove(force=True)
        trees = []
        for doc in _split_json(out.decode("utf-8", "replace")):
            trees.append(KernelTree(**doc))
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
        common_name = next(d for d in deps if re.fullmatch(r"linux-headers-.+-common", d))
        abi = common_name[len("linux-headers-"):-len("-common")]
        kbuild_name = next((d for d in deps if d.startswith("linux-kbuild-")),
                           f"linux-kbuild-{abi}")
        image_index = (target_index if self.image_arch == target
                       else _index(mirror, suites, self.image_arch.debian))
        wanted = [headers, target_index[common_name], image_index[kbuild_name]]
        if debuginfo:
            dbg = target_index.get(f"linux-image-{release}-dbg")
            if dbg is None:
                raise KernelTreeError(f"no debuginfo package linux-image-{release}-dbg on "
                                      f"{mirror.url}")
            wanted.append(dbg)
        job = self._job()
        token = uuid.uuid4().hex[:12]
        staging = f"{MOUNT}/.stapfarm/staging/{token}"
        try:
            # Only leftovers of interrupted adds are removed: a concurrent add's staging
            # directory is younger than a day.
            job.exec_run(["sh", "-c", (f"mkdir -p {MOUNT}/.stapfarm/staging; find "
                                      f"{MOUNT}/.stapfarm/staging -mindepth 1 -maxdepth 1 "
                                      f"-mmin +1440 -exec rm -rf {{}} +; mkdir -p {staging}"
                                      f" {MOUNT}/{MANIFESTS}")])
            kernelvariables = ""
            for pkg in wanted:
                if pkg is not headers and self._present(job, pkg, release, abi):
                    say(f"{pkg.name}: already present")
                    continue
                is_dbg = pkg.name.endswith("-dbg")
                got = self._stage(job, mirror, pkg, staging, release, is_dbg, say)
                if pkg is headers:
                    kernelvariables = got
            compiler = parse_kernelvariables(kernelvariables)
            if compiler:
                code, _ = job.exec_run(["sh", "-c", f"command -v {compiler}"])
                if code != 0:
                    raise KernelTreeError(
                        f"kernel {release} needs the compiler {compiler}, which image "
                        f"{self.image} lacks",
                        hint="add it to COMPILERS in images/Dockerfile."
                             f"{self.image_arch.machine} and rebuild")
            links = [f"mkdir -p {MOUNT}/usr/lib/modules/{release} {MOUNT}/usr/src/",
                     (f"ln -sfn ../../../src/linux-headers-{release} "
                     f"{MOUNT}/usr/lib/modules/{release}/build"),
                     (f"ln -sfn ../../../src/linux-headers-{abi}-common "
                     f"{MOUNT}/usr/lib/modules/{release}/source")]
            if debuginfo:
                links += [f"mkdir -p {MOUNT}/boot",
                          (f"ln -sfn ../usr/lib/debug/boot/System.map-{release} "
                          f"{MOUNT}/boot/System.map-{release}")]
            code, out = job.exec_run(["sh", "-ec", f"cp -a {staging}/. {MOUNT}/; "
                                      f"rm -rf {staging}; " + "; ".join(links)])
            if code != 0:
                raise KernelTreeError(f"installing {release} into volume {self.volume} "
                                      f"failed: {out.decode(errors='replace').strip()}")
            tree = KernelTree(release=release, arch=target.stap, image_arch=self.image_arch.stap,
                              abi=abi, compiler=compiler, debuginfo=debuginfo,
                              packages={p.name: p.version for p in wanted},
                              created=time.time())
            manifest = json.dumps(asdict(tree), indent=1).encode()
            job.put_archive(f"{MOUNT}/{MANIFESTS}", _tar_of({f"{release}.json": manifest}))
            say(f"kernel tree {release} ({target}, for the {self.image_arch} image) is ready")
            return tree
        finally:
            job.exec_run(["rm", "-rf", staging])
            job.remove(force=True)

    def _present(self, job: Any, pkg: Package, release: str, abi: str) -> bool:
        paths = {"common": f"usr/src/linux-headers-{abi}-common/Makefile",
                 "kbuild": f"usr/lib/linux-kbuild-{abi}/scripts",
                 "dbg": f"usr/lib/debug/boot/vmlinux-{release}"}
        key = ("common" if pkg.name.endswith("-common") else
               "kbuild" if pkg.name.startswith("linux-kbuild-") else
               "dbg" if pkg.name.endswith("-dbg") else "")
        if not key:
            return False
        code, _ = job.exec_run(["test", "-e", f"{MOUNT}/{paths[key]}"])
        return bool(code == 0)

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
                    for info, data in iter_data_members(raw, pkg, _progress(pkg.name, say)):
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
            if not job.put_archive(staging, spool):
                raise KernelTreeError(f"could not write {pkg.name} into volume {self.volume}")
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
            job.exec_run(["rm", "-rf"] + [f"{MOUNT}/{p}" for p in paths])
        finally:
            job.remove(force=True)
        return True


def _progress(name: str, say: Say) -> Callable[[int, int], None]:
    state = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if total and done / total >= state["next"]:
            say(f"  {name}: {100 * done // total}% of {total / 1e6:.1f} MB")
            state["next"] += 0.25

    return report


def _tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _split_json(text: str) -> list[dict[str, Any]]:
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
