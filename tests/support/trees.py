"""The session's kernel trees (KernelTrees, filled by the `kernel_trees` fixture) and
`run_stap`: stap run in a throwaway container of a server image, as the farm's servers run it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from farm.core import labels
from farm.core.arch import Arch
from farm.engine.trees import TreeStore
from farm.kernels import trees as kernels
from farm.kernels.debian import Mirror
from tests.support.stap_run import run_in_image

SUITES = ("trixie",)  # Debian 13: the kernels the issue asks the farm to build for


@dataclass
class KernelTrees:
    """The session's kernel trees, in test-prefixed volumes, each added at most once.

    The x86_64 image's trees (native amd64 and cross arm64) carry debuginfo, so DWARF probes
    compile; the aarch64 image's arm64 tree (emulated strategy) does not.
    """

    client: Any
    mirror: Mirror
    releases: dict[str, str]
    stores: dict[str, TreeStore]
    debuginfo: dict[str, bool]
    log: list[str] = field(default_factory=list)
    _done: dict[tuple[str, str], kernels.KernelTree | Exception] = field(
        default_factory=dict)

    def store(self, image_arch: Arch) -> TreeStore:
        return self.stores[image_arch.stap]

    def volume(self, image_arch: Arch) -> str:
        """The kernel volume to mount at /srv/stapfarm/kernels in IMAGE_ARCH's image."""
        return self.stores[image_arch.stap].volume

    def image(self, image_arch: Arch) -> str:
        return self.stores[image_arch.stap].image

    def release(self, target: Arch) -> str:
        return self.releases[target.stap]

    def tree(self, image_arch: Arch, target: Arch) -> kernels.KernelTree:
        """TARGET's newest release, present in IMAGE_ARCH's volume (added on first use).

        A failure is remembered and raised again, so a broken download is tried once only.
        """
        key = (image_arch.stap, target.stap)
        if key not in self._done:
            try:
                self._done[key] = self.store(image_arch).add(
                    self.mirror, SUITES, target, self.release(target),
                    debuginfo=self.debuginfo[image_arch.stap], say=self.log.append)
            except Exception as e:  # noqa: BLE001 - remembered, re-raised below
                self._done[key] = e
        got = self._done[key]
        if isinstance(got, Exception):
            raise got
        return got


def _label_of_volume(client: Any, volume: str) -> str:
    import docker.errors

    try:
        return str((client.volumes.get(volume).attrs.get("Labels") or {}).get(labels.TEST, ""))
    except docker.errors.NotFound:
        return ""


def run_stap(docker_client: Any, image: str, volume: str, args: list[str],
             files: Mapping[str, bytes | str] | None = None, platform: str | None = None, *,
             test_label: str | None = None,
             timeout: float = 1800) -> tuple[int, str, dict[str, bytes]]:
    """Run `stap ARGS` in a throwaway container of IMAGE as the farm's servers would.

    Read-only root, tmpfs /tmp and home, kernel VOLUME read-only at /srv/stapfarm/kernels,
    user stap-server, no network. FILES (name -> content) are placed in stap's working
    directory, a labelled per-run volume, from which the produced *.ko files are copied with
    get_archive. The container and its work volume carry the test label (TEST_LABEL, else
    VOLUME's) and are removed before returning.

    Returns (exit code, stdout+stderr, {module file name: bytes}); exit code 124 and no
    modules when stap did not finish within TIMEOUT seconds.
    """
    label = test_label or _label_of_volume(docker_client, volume)
    if not label:
        raise ValueError(f"run_stap: volume {volume} has no {labels.TEST} label; pass "
                         "test_label= so the run is cleaned up")
    code, output, modules, _ = run_in_image(docker_client, image, volume, args, label, files,
                                            platform, timeout=timeout)
    return code, output, modules


