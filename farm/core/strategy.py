"""Build strategies: which image (and so which compiler) builds for a target architecture."""

from __future__ import annotations

from dataclasses import dataclass

from farm.core.arch import Arch
from farm.core.spec import Strategy

# What each image carries besides its native compiler (images/Dockerfile.*: COMPILERS).
CROSS_TARGETS: dict[str, frozenset[str]] = {
    "x86_64": frozenset({"arm64"}),
    "arm64": frozenset({"x86_64"}),
}


@dataclass(frozen=True)
class BuildPlan:
    """How one server builds: its strategy and the architecture of the image that runs it."""

    strategy: Strategy
    target: Arch
    image_arch: Arch

    @property
    def cross_compile(self) -> str:
        """The CROSS_COMPILE prefix stap needs, "" unless cross."""
        return self.target.cross_compile if self.strategy is Strategy.CROSS else ""


def resolve(strategy: Strategy, target: Arch, host: Arch) -> BuildPlan:
    """Pick the build for TARGET on HOST: `auto` is native, else cross, else emulated."""
    if strategy is Strategy.AUTO:
        if target == host:
            strategy = Strategy.NATIVE
        elif target.stap in CROSS_TARGETS.get(host.stap, frozenset()):
            strategy = Strategy.CROSS
        else:
            strategy = Strategy.EMULATED
    if strategy is Strategy.NATIVE:
        # "native" for a foreign target can only mean its own image, i.e. emulated here.
        return BuildPlan(Strategy.NATIVE if target == host else Strategy.EMULATED, target, target)
    if strategy is Strategy.CROSS:
        return BuildPlan(Strategy.CROSS if target != host else Strategy.NATIVE, target, host)
    return BuildPlan(Strategy.EMULATED if target != host else Strategy.NATIVE, target, target)
