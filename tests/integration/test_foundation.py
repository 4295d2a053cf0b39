"""Issue 2, "What must be shown": the farm's images build modules with the farm's trees.

For the newest Debian 13 (trixie) kernel release the mirror offers today for each
architecture (asked from the mirror, never written down here), `stap -p4` in the farm's server
images with the farm's kernel trees builds `probe begin`, tracepoint, syscall and DWARF
scripts natively for x86_64, cross for arm64 in the x86_64 image, and (`probe begin`)
emulated in the aarch64 image. Plus the `kernels` and `images` actions' promises.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, replace
from typing import Any

import pytest

from farm.core import labels
from farm.core.arch import ARM64, X86_64, Arch
from farm.core.errors import KernelTreeError
from farm.core.spec import Strategy
from farm.core.strategy import BuildPlan, resolve
from farm.engine import images
from farm.engine.docker import Engine
from farm.engine.trees import TreeStore
from farm.kernels import trees as kernels
from farm.manual.actions import images_action, kernels_action
from tests.support.elf import elf_machine, vermagic
from tests.support.trees import SUITES, KernelTrees, run_stap

pytestmark = pytest.mark.docker

HOST = X86_64  # the farm's images are built for an x86_64 host (this CI)

BEGIN = 'probe begin { println("hello"); exit() }'
TRACEPOINT = 'probe kernel.trace("sched:sched_switch") { println(pid()); exit() }'
SYSCALL = 'probe syscall.openat { println(filename); exit() }'
DWARF = 'probe kernel.function("vfs_read") { printf("%d\\n", $count) }'


@dataclass(frozen=True)
class Build:
    name: str
    strategy: Strategy
    target: Arch

    @property
    def plan(self) -> BuildPlan:
        return resolve(self.strategy, self.target, HOST)


NATIVE = Build("native-x86_64", Strategy.NATIVE, X86_64)
CROSS = Build("cross-arm64", Strategy.CROSS, ARM64)
EMULATED = Build("emulated-arm64", Strategy.EMULATED, ARM64)


def compile_module(client: Any, trees: KernelTrees, build: Build, script: str, module: str,
                   timeout: float = 900) -> str:
    """Build SCRIPT as MODULE.ko for BUILD; check machine and vermagic; return stap's output."""
    plan = build.plan
    tree = trees.tree(plan.image_arch, build.target)
    release = trees.release(build.target)
    assert tree.release == release
    args = ["-p4", "-r", release, "-m", module]
    if plan.cross_compile:
        args += ["-a", build.target.stap, "-B", f"CROSS_COMPILE={plan.cross_compile}"]
    args.append("script.stp")
    rc, output, modules = run_stap(client, trees.image(plan.image_arch),
                                   trees.volume(plan.image_arch), args,
                                   files={"script.stp": script},
                                   platform=plan.image_arch.docker_platform, timeout=timeout)
    assert rc == 0, f"stap {' '.join(args)} failed ({rc}):\n{output}"
    assert f"{module}.ko" in modules, f"no {module}.ko among {sorted(modules)}:\n{output}"
    ko = modules[f"{module}.ko"]
    assert elf_machine(ko) == build.target.elf_machine
    magic = vermagic(ko)
    assert magic.split()[0] == release, magic
    return output


# --------------------------------------------------------------------------- trees


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_trees_for_the_newest_trixie_releases(kernel_trees: KernelTrees,
                                              releases: dict[str, str]) -> None:
    """The session's trees: debuginfo for the x86_64 image, headers only for aarch64's."""
    for image_arch, target in ((X86_64, X86_64), (X86_64, ARM64), (ARM64, ARM64)):
        tree = kernel_trees.tree(image_arch, target)
        assert tree.release == releases[target.stap]
        assert (tree.arch, tree.image_arch) == (target.stap, image_arch.stap)
        assert tree.debuginfo is (image_arch == X86_64)
        # Debian pins the kernel's own compiler, e.g. aarch64-linux-gnu-gcc-<N>
        assert re.fullmatch(re.escape(target.cross_compile) + r"gcc(-\d+)?", tree.compiler)
        assert f"linux-headers-{tree.release}" in tree.packages
        listed = {t.release for t in kernel_trees.store(image_arch).list()}
        assert tree.release in listed


# --------------------------------------------------------------------------- modules


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("build", [NATIVE, CROSS], ids=lambda b: b.name)
def test_probe_begin(docker_client: Any, kernel_trees: KernelTrees, build: Build) -> None:
    compile_module(docker_client, kernel_trees, build, BEGIN, "hello")


@pytest.mark.slow
@pytest.mark.extended  # ~7 min; tests/e2e/test_servers.py compiles emulated through the farm
@pytest.mark.timeout(3600)
def test_probe_begin_emulated_aarch64(docker_client: Any, kernel_trees: KernelTrees) -> None:
    """The arm64 image under qemu-user: ~20 times slower than cross, but it works."""
    assert EMULATED.plan.image_arch == ARM64 and not EMULATED.plan.cross_compile
    compile_module(docker_client, kernel_trees, EMULATED, BEGIN, "hello", timeout=3000)


@pytest.mark.slow
@pytest.mark.extended  # ~3 min; tests/e2e/test_servers.py and test_endpoint.py compile
# tracepoint modules (native and cross) through the farm with the real client
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("build", [NATIVE, CROSS], ids=lambda b: b.name)
def test_tracepoint(docker_client: Any, kernel_trees: KernelTrees, build: Build) -> None:
    compile_module(docker_client, kernel_trees, build, TRACEPOINT, "tp")


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("build", [NATIVE, CROSS], ids=lambda b: b.name)
def test_syscall(docker_client: Any, kernel_trees: KernelTrees, build: Build) -> None:
    compile_module(docker_client, kernel_trees, build, SYSCALL, "sc")


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("build", [NATIVE, CROSS], ids=lambda b: b.name)
def test_dwarf_with_debuginfo(docker_client: Any, kernel_trees: KernelTrees,
                              build: Build) -> None:
    output = compile_module(docker_client, kernel_trees, build, DWARF, "dw")
    # the real System.map from -dbg is in place, not the package's stub
    assert "symbol table missing" not in output, output


# --------------------------------------------------------------------------- kernels action


def _action(action: Any, argv: list[str], environ: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = action(argv, environ, out, err)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("arch", ["aarch64", "amd64"])
def test_kernels_add_unknown_release_is_one_clear_line(farm_environ: dict[str, str],
                                                       docker_client: Any, arch: str,
                                                       mirror: Any) -> None:
    release = f"9.9.1+test1-{Arch.parse(arch).debian}"
    rc, out, err = _action(kernels_action, ["add", "-a", arch, "-r", release], farm_environ)
    assert rc == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("stap-server: ")
    assert "Traceback" not in err + out
    assert release in line  # which release
    assert Arch.parse(arch).stap in line  # which arch
    assert "trixie" in line and mirror.url in line  # where it looked
    assert "kernels available" in line and "-r /path/to/build" in line  # how to supply one


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kernels_add_list_remove(docker_client: Any, farm_environ: dict[str, str],
                                 releases: dict[str, str], server_images: dict[str, str],
                                 test_prefix: str, test_label: str) -> None:
    """A headers-only tree in a volume of its own: added, listed, removed without a trace."""
    env = dict(farm_environ, STAPFARM_PREFIX=f"{test_prefix}cli")
    release = releases[X86_64.stap]
    rc, out, err = _action(kernels_action, ["add", "-a", "amd64", "-r", release], env)
    assert rc == 0, err
    assert "is ready" in out

    rc, out, err = _action(kernels_action, ["list"], env)
    assert rc == 0, err
    assert f"{release}\tx86_64\timage x86_64" in out.splitlines()

    rc, out, err = _action(kernels_action, ["remove", "-a", "x86_64", "-r", release], env)
    assert rc == 0, err
    assert "removed kernel tree" in out

    rc, out, err = _action(kernels_action, ["list"], env)
    assert rc == 0, err
    assert release not in out
    volume = kernels.volume_name(f"{test_prefix}cli", X86_64)
    abi = release.removesuffix(f"-{X86_64.debian}")  # -common and kbuild went too
    assert labels.TEST in docker_client.volumes.get(volume).attrs["Labels"]
    left = docker_client.containers.run(
        server_images[X86_64.stap], entrypoint=["sh", "-c"],
        command=[(f"cd {kernels.MOUNT} && find usr boot -mindepth 1 -maxdepth 4 "
                  f"-name '*{abi}*' 2>/dev/null; true")],
        volumes={volume: {"bind": kernels.MOUNT, "mode": "ro"}}, network_mode="none",
        labels={labels.TEST: test_label}, remove=True)
    assert left.decode().split() == []


@pytest.fixture
def image_without_compilers(docker_client: Any, server_images: dict[str, str],
                            test_prefix: str, test_label: str) -> Any:
    """The x86_64 server image with its gcc-<N> compilers removed (a test-only tag)."""
    tag = f"{test_prefix}/nocc:x86_64"
    dockerfile = (f"FROM {server_images[X86_64.stap]}\nUSER root\n"
                  "RUN rm -f /usr/bin/*-linux-gnu-gcc-[0-9]*\nUSER stap-server\n")
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True,
                               forcerm=True, labels={labels.TEST: test_label})
    yield tag
    docker_client.images.remove(tag, force=True)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tree_needing_a_missing_compiler_is_refused(docker_client: Any, mirror: Any,
                                                    releases: dict[str, str],
                                                    image_without_compilers: str,
                                                    test_prefix: str,
                                                    test_label: str) -> None:
    store = TreeStore(Engine(docker_client, f"{test_prefix}nocc", test_label), X86_64,
                      image_without_compilers)
    with pytest.raises(KernelTreeError) as info:
        store.add(mirror, SUITES, X86_64, releases[X86_64.stap])
    message = str(info.value)
    assert re.search(r"needs the compiler x86_64-linux-gnu-gcc(-\d+)?, which image "
                     + re.escape(image_without_compilers) + " lacks", message), message
    assert "\n" not in message
    assert store.list() == []  # no tree: nothing half-installed was recorded


# --------------------------------------------------------------------------- images


def test_images_are_labelled_and_build_is_a_noop_when_up_to_date(
        docker_client: Any, farm_environ: dict[str, str],
        server_images: dict[str, str]) -> None:
    from farm.manual.config import load_global

    flags = os.environ.get("IMAGE_BUILD_FLAGS", "--allow-expired-release").split()
    gcfg = load_global([], farm_environ)
    if "--allow-expired-release" in flags:
        gcfg = replace(gcfg, apt_allow_expired=True)
    before = {}
    engine = Engine(docker_client)
    for arch in (X86_64, ARM64):
        spec = images.server_image(gcfg, arch)
        tag, state = spec.tag, images.status(engine, spec)
        image = docker_client.images.get(tag)
        assert re.fullmatch(r"[0-9a-f]{16}", image.labels.get(labels.IMAGE_INPUTS, "")), tag
        if state != "up to date":
            pytest.fail(f"{tag} is {state} for its current inputs: run `make setup` first "
                        "(this test does not rebuild)", pytrace=False)
        before[tag] = image.id
    rc, out, err = _action(images_action, ["build", *flags], farm_environ)
    assert rc == 0, err
    for tag in before:
        assert f"{tag}: up to date" in out.splitlines(), out
    assert "building" not in out
    assert {tag: docker_client.images.get(tag).id for tag in before} == before
