"""Kernel trees without Docker: which packages are releases, the compiler a tree pins, and
TreeStore.add's decisions against an in-memory mirror and engine.

Synthetic data only: releases look like `9.9.1+test1-amd64`, compilers like `gcc-99`.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import docker.errors
import pytest

from farm.core.arch import ARM64, X86_64, Arch
from farm.core.errors import KernelTreeError
from farm.engine import trees as store_module
from farm.engine.docker import Engine
from farm.engine.trees import TreeStore
from farm.kernels import trees as kernels
from farm.kernels.debian import Package
from farm.kernels.trees import (
    KernelTree,
    _release_of_headers,
    available,
    parse_kernelvariables,
    volume_name,
)

KERNELVARIABLES = """\
override ARCH = {karch}
override KERNELRELEASE = {release}
CCACHE = ccache
CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-99
DEB_BUILD_ARCH ?= $(shell dpkg --print-architecture)
override CROSS_COMPILE = {gnu}-
override CROSS_COMPILE_COMPAT = arm-linux-gnueabihf-
override CROSS32_COMPILE = arm-linux-gnueabihf-
export CROSS_COMPILE_COMPAT CROSS32_COMPILE
DEBIAN_KERNEL_NO_CC_VERSION_CHECK = y
"""


def pkg(name: str, version: str = "9.9.1-1", arch: str = "amd64", depends: str = "",
        data: bytes = b"", suite: str = "trixie") -> Package:
    return Package(name=name, version=version, architecture=arch,
                   filename=f"pool/main/l/linux/{name}_{version}_{arch}.deb", size=len(data),
                   sha256=hashlib.sha256(data).hexdigest() if data else "", depends=depends,
                   suite=suite)


def headers(rel: str, debarch: str, abi: str = "9.9.1+test1", version: str = "9.9.1-1",
            extra: str = "") -> Package:
    return pkg(f"linux-headers-{rel}", version, debarch,
               f"linux-headers-{abi}-common{extra} (= {version}), "
               f"linux-kbuild-{abi} (= {version}), gcc-99")


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("package, arch, release", [
    (headers("9.9.1+test1-amd64", "amd64"), X86_64, "9.9.1+test1-amd64"),
    (headers("9.9.1+test1-arm64", "arm64"), ARM64, "9.9.1+test1-arm64"),
    # only the default flavour
    (headers("9.9.1+test1-rt-amd64", "amd64", extra="-rt"), X86_64, None),
    (headers("9.9.1+test1-cloud-amd64", "amd64"), X86_64, None),
    (headers("9.9.1+test1-arm64-16k", "arm64"), ARM64, None),
    (headers("9.9.1+test1-rt-arm64", "arm64", extra="-rt"), ARM64, None),
    # wrong architecture, meta packages, common headers, other packages
    (headers("9.9.1+test1-amd64", "amd64"), ARM64, None),
    (pkg("linux-headers-amd64", depends="linux-headers-9.9.1+test1-amd64 (= 9.9.1-1)"),
     X86_64, None),
    (pkg("linux-headers-9.9.1+test1-common", arch="all"), X86_64, None),
    (pkg("linux-image-9.9.1+test1-amd64", depends="linux-headers-9.9.1+test1-common"),
     X86_64, None),
])
def test_release_of_headers(package: Package, arch: Arch, release: str | None) -> None:
    assert _release_of_headers(package, arch) == release


@pytest.mark.parametrize("arch", [X86_64, ARM64], ids=str)
def test_parse_kernelvariables_like_debians(arch: Arch) -> None:
    text = KERNELVARIABLES.format(karch="x86" if arch == X86_64 else "arm64",
                                  release=f"9.9.1+test1-{arch.debian}", gnu=arch.gnu)
    assert parse_kernelvariables(text) == f"{arch.gnu}-gcc-99"


@pytest.mark.parametrize("text, compiler", [
    ("", ""),
    ("override ARCH = x86\n", ""),
    ("CC = gcc-99\n", "gcc-99"),
    ("CC := $(CROSS_COMPILE)gcc-98\nCROSS_COMPILE := x86_64-linux-gnu-\n",
     "x86_64-linux-gnu-gcc-98"),
    ("  override CROSS_COMPILE=aarch64-linux-gnu-\nCC=$(CROSS_COMPILE)gcc-97\n",
     "aarch64-linux-gnu-gcc-97"),
    ("CC = $(CROSS_COMPILE)gcc-99\n", "gcc-99"),  # no CROSS_COMPILE: the host's compiler
    ("CCACHE = ccache\nCROSS_COMPILE_COMPAT = arm-linux-gnueabihf-\nCC = clang-99\n",
     "clang-99"),
])
def test_parse_kernelvariables(text: str, compiler: str) -> None:
    assert parse_kernelvariables(text) == compiler


def test_volume_names_and_tree_ids() -> None:
    assert volume_name("stapfarm", X86_64) == "stapfarm-kernels-amd64"
    assert volume_name("stapfarmtestabc", ARM64) == "stapfarmtestabc-kernels-arm64"
    tree = KernelTree(release="9.9.1+test1-arm64", arch="arm64", image_arch="x86_64",
                      abi="9.9.1+test1", compiler="aarch64-linux-gnu-gcc-99", debuginfo=False,
                      packages={})
    assert tree.tree_id == "9.9.1+test1-arm64@x86_64"


def test_split_json_reads_concatenated_manifests() -> None:
    docs = [{"release": "a"}, {"release": "b", "packages": {"x": "1"}}]
    text = " ".join(json.dumps(d, indent=1).replace("\n", " ") for d in docs)
    assert kernels.split_json(text + "\n") == docs
    assert kernels.split_json(" \n") == []


# --------------------------------------------------------------------------- fake mirror


def deb_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data_tar = buf.getvalue()

    def member(name: str, data: bytes) -> bytes:
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return head + data + (b"\n" if len(data) % 2 else b"")

    return b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", data_tar)


class FakeMirror:
    """Packages per (suite, debarch) and their .deb bytes by filename."""

    url = "http://mirror.invalid/debian"

    def __init__(self) -> None:
        self.index: dict[tuple[str, str], list[Package]] = {}
        self.debs: dict[str, bytes] = {}
        self.downloaded: list[str] = []

    def add(self, suite: str, debarch: str, package: Package,
            files: dict[str, bytes] | None = None) -> Package:
        if files is not None:
            data = deb_of(files)
            package = Package(**{**package.__dict__, "size": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()})
            self.debs[package.filename] = data
        self.index.setdefault((suite, debarch), []).append(package)
        return package

    def packages(self, suite: str, debarch: str) -> list[Package]:
        return list(self.index.get((suite, debarch), []))

    def open_deb(self, package: Package) -> IO[bytes]:
        self.downloaded.append(package.filename)
        return io.BytesIO(self.debs[package.filename])


def offer(mirror: FakeMirror, rel_abi: str, version: str, target: Arch,
          image_arch: Arch = X86_64, suite: str = "trixie", dbg: bool = False) -> None:
    """A complete release: flavour headers, -common, kbuild for both arches, maybe -dbg."""
    rel = f"{rel_abi}-{target.debian}"
    kv = KERNELVARIABLES.format(karch=target.debian, release=rel, gnu=target.gnu).encode()
    mirror.add(suite, target.debian, headers(rel, target.debian, rel_abi, version),
               {f"usr/src/linux-headers-{rel}/.kernelvariables": kv,
                f"usr/src/linux-headers-{rel}/Makefile": b"include ../common\n",
                f"usr/share/doc/linux-headers-{rel}/copyright": b"GPL\n"})
    for debarch in {target.debian, image_arch.debian}:
        mirror.add(suite, debarch, pkg(f"linux-headers-{rel_abi}-common", version, "all"),
                   {f"usr/src/linux-headers-{rel_abi}-common/Makefile": b"all:\n"})
        mirror.add(suite, debarch, pkg(f"linux-kbuild-{rel_abi}", version, debarch),
                   {f"usr/lib/linux-kbuild-{rel_abi}/scripts/basic/fixdep":
                    f"fixdep for {debarch}".encode()})
    if dbg:
        mirror.add(suite, target.debian, pkg(f"linux-image-{rel}-dbg", version, target.debian),
                   {f"usr/lib/debug/boot/vmlinux-{rel}": b"\x7fELF vmlinux",
                    f"usr/lib/debug/boot/System.map-{rel}": b"ffffffff81000000 T _stext\n",
                    f"usr/lib/debug/lib/modules/{rel}/kernel/fs/ext4.ko": b"not kept",
                    f"usr/share/doc/linux-image-{rel}-dbg/changelog": b"not kept"})


def test_available_is_newest_first_per_default_flavour() -> None:
    mirror = FakeMirror()
    offer(mirror, "9.9.1+test1", "9.9.1-1", X86_64)
    offer(mirror, "9.9.10+test1", "9.9.10-1", X86_64)
    offer(mirror, "9.9.9+test1", "9.9.9-2", X86_64, suite="trixie-updates")
    offer(mirror, "9.9.2+test1", "9.9.2-1", ARM64)
    mirror.add("trixie", "amd64", headers("9.9.11+test1-rt-amd64", "amd64", "9.9.11+test1",
                                          "9.9.11-1", extra="-rt"))
    mirror.add("trixie", "amd64", headers("9.9.11+test1-cloud-amd64", "amd64",
                                          "9.9.11+test1", "9.9.11-1"))
    suites = ("trixie", "trixie-updates")
    assert available(mirror, suites, X86_64) == [  # type: ignore[arg-type]
        "9.9.10+test1-amd64", "9.9.9+test1-amd64", "9.9.1+test1-amd64"]
    assert available(mirror, ("trixie",), X86_64) == [  # type: ignore[arg-type]
        "9.9.10+test1-amd64", "9.9.1+test1-amd64"]
    assert available(mirror, suites, ARM64) == ["9.9.2+test1-arm64"]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fake engine


@dataclass
class FakeJob:
    missing: set[str]
    commands: list[list[str]] = field(default_factory=list)
    archives: dict[str, list[str]] = field(default_factory=dict)  # path -> member names
    manifests: list[dict[str, Any]] = field(default_factory=list)
    removed: bool = False
    name: str = "job"
    status: str = "running"

    def stop(self, timeout: int = 10) -> None:
        self.status = "exited"

    def exec_run(self, cmd: list[str]) -> tuple[int, bytes]:
        self.commands.append(cmd)
        if cmd[0] == "test":
            return 1, b""
        if cmd[:2] == ["sh", "-c"] and cmd[2].startswith("command -v "):
            return (1 if cmd[2].split()[-1] in self.missing else 0), b""
        return 0, b"\n"

    def put_archive(self, path: str, data: Any) -> bool:
        raw = data if isinstance(data, bytes) else data.read()
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            names = tar.getnames()
            if path.endswith(kernels.MANIFESTS):
                for member in tar:
                    f = tar.extractfile(member)
                    assert f is not None
                    self.manifests.append(json.loads(f.read()))
        self.archives.setdefault(path, []).extend(names)
        return True

    def remove(self, force: bool = False) -> None:
        self.removed = True


class FakeEngine:
    """Just enough of docker.DockerClient for TreeStore (through the real Engine adapter)."""

    def __init__(self, missing: set[str] | None = None) -> None:
        self.volume_names: set[str] = set()
        self.jobs: list[FakeJob] = []
        self.missing = missing or set()
        self.volumes = self
        self.containers = self

    # volumes
    def get(self, name: str) -> str:
        if name not in self.volume_names:
            raise docker.errors.NotFound(f"volume {name}")
        return name

    def create(self, name: str, labels: dict[str, str]) -> str:
        self.volume_names.add(name)
        return name

    # containers
    def run(self, image: str, **kwargs: Any) -> FakeJob:
        job = FakeJob(self.missing)
        self.jobs.append(job)
        return job


@pytest.fixture(autouse=True)
def _spool_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TreeStore spools downloads in /var/tmp; keep the unit tests' spools in tmp_path."""
    real = store_module.tempfile.TemporaryFile

    def spool(*args: Any, **kwargs: Any) -> Any:
        kwargs["dir"] = str(tmp_path)
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module.tempfile, "TemporaryFile", spool)


def staged(job: FakeJob) -> list[str]:
    return [n for path, names in job.archives.items() if "/staging/" in path for n in names]


def test_add_cross_tree_uses_the_image_arch_kbuild() -> None:
    mirror = FakeMirror()
    offer(mirror, "9.9.1+test1", "9.9.1-1", ARM64, image_arch=X86_64)
    engine = FakeEngine()
    store = TreeStore(Engine(engine, "unit", "t"), X86_64, "unit/server:x86_64")
    said: list[str] = []
    tree = store.add(mirror, ("trixie",), ARM64, "9.9.1+test1-arm64",  # type: ignore[arg-type]
                     say=said.append)
    assert tree.release == "9.9.1+test1-arm64" and tree.arch == "arm64"
    assert tree.image_arch == "x86_64" and tree.abi == "9.9.1+test1"
    assert tree.compiler == "aarch64-linux-gnu-gcc-99"
    assert not tree.debuginfo
    kbuild = next(f for f in mirror.downloaded if "linux-kbuild" in f)
    assert kbuild.endswith("_amd64.deb")  # helpers for the image's arch, not the target's
    job = engine.jobs[-1]
    assert job.removed
    names = staged(job)
    assert "./usr/src/linux-headers-9.9.1+test1-arm64/.kernelvariables" in names
    assert not any("usr/share/doc" in n for n in names)
    assert [m["release"] for m in job.manifests] == ["9.9.1+test1-arm64"]
    links = next(c[-1] for c in job.commands if c[:2] == ["sh", "-ec"])
    assert "usr/lib/modules/9.9.1+test1-arm64/build" in links
    assert any("is ready" in line for line in said)


def test_add_with_debuginfo_keeps_only_vmlinux_and_system_map() -> None:
    mirror = FakeMirror()
    offer(mirror, "9.9.1+test1", "9.9.1-1", X86_64, dbg=True)
    engine = FakeEngine()
    store = TreeStore(Engine(engine, "unit", "t"), X86_64, "unit/server:x86_64")
    tree = store.add(mirror, ("trixie",), X86_64, "9.9.1+test1-amd64",  # type: ignore[arg-type]
                     debuginfo=True)
    assert tree.debuginfo
    assert "linux-image-9.9.1+test1-amd64-dbg" in tree.packages
    names = staged(engine.jobs[-1])
    assert "./usr/lib/debug/boot/vmlinux-9.9.1+test1-amd64" in names
    assert "./usr/lib/debug/boot/System.map-9.9.1+test1-amd64" in names
    assert not any(n.endswith("ext4.ko") or "changelog" in n for n in names)
    links = next(c[-1] for c in engine.jobs[-1].commands if c[:2] == ["sh", "-ec"])
    assert "boot/System.map-9.9.1+test1-amd64" in links


def test_add_unknown_release_is_one_clear_error() -> None:
    mirror = FakeMirror()
    offer(mirror, "9.9.1+test1", "9.9.1-1", X86_64)
    engine = FakeEngine()
    store = TreeStore(Engine(engine, "unit", "t"), X86_64, "unit/server:x86_64")
    with pytest.raises(KernelTreeError) as info:
        store.add(mirror, ("trixie",), X86_64, "9.9.7+test1-amd64")  # type: ignore[arg-type]
    text = str(info.value)
    assert "\n" not in text
    assert "'9.9.7+test1-amd64'" in text and "x86_64" in text  # which release, which arch
    assert "trixie" in text and mirror.url in text  # where it looked
    assert "9.9.1+test1-amd64" in text  # what there is
    assert "kernels available" in text and "-r /path/to/build" in text  # what to do
    assert mirror.downloaded == []
    assert engine.jobs == []  # nothing was started, nothing half-written


def test_add_refuses_a_tree_whose_compiler_the_image_lacks() -> None:
    mirror = FakeMirror()
    offer(mirror, "9.9.1+test1", "9.9.1-1", X86_64)
    engine = FakeEngine(missing={"x86_64-linux-gnu-gcc-99"})
    store = TreeStore(Engine(engine, "unit", "t"), X86_64, "unit/server:x86_64")
    with pytest.raises(KernelTreeError) as info:
        store.add(mirror, ("trixie",), X86_64, "9.9.1+test1-amd64")  # type: ignore[arg-type]
    text = str(info.value)
    assert "needs the compiler x86_64-linux-gnu-gcc-99" in text
    assert "unit/server:x86_64" in text and "Dockerfile.x86_64" in text
    job = engine.jobs[-1]
    assert job.manifests == []  # no tree recorded
    assert not any(c[:2] == ["sh", "-ec"] for c in job.commands)  # nothing copied in place
    assert job.removed
